"""The final evaluation of a checkpoint: the length penalty α tuned on val, test decoded at
the chosen α only, and the choice between a run's checkpoints by val BLEU.

``tmt-train`` runs it on ``best.pt`` and ``averaged.pt`` at the end of training;
``tmt-evaluate --alpha-grid`` runs the same α search. Test sets never influence a choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from transformer_mt.data.directions import corpora
from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import Translator
from transformer_mt.evaluation.metrics import MetricScore, score
from transformer_mt.formats.results import CheckpointResult, Score


@dataclass
class EvalSet:
    """Source sentences and one reference each, named for reports (e.g. "val"); for a
    multilingual model, the target language asked for (its tag leads each source)."""

    name: str
    sources: list[str]
    references: list[str]
    tgt_lang: str | None = None


def eval_sets(data_cfg: Any, role: str, max_sentences: int | None = None) -> list[EvalSet]:
    """The val ("valid") or test sets of a ``data`` config, each whole or its first
    ``max_sentences``: one set per file, and for a multilingual config one per direction,
    named by it and asking for its target language."""
    out = []
    for corpus in corpora(data_cfg, role):
        src, ref = corpus.read()
        n = max_sentences or len(src)
        target = corpus.tgt_lang if corpus.tag is not None else None
        out.append(EvalSet(corpus.label, src[:n], ref[:n], target))
    return out


@dataclass
class Decoded:
    """Hypotheses of one set and their scores."""

    options: SearchOptions
    hypotheses: list[str]
    scores: dict[str, MetricScore]

    @property
    def bleu(self) -> float:
        """The corpus BLEU score."""
        return self.scores["bleu"].score

    def summary(self) -> Score:
        """BLEU, chrF and the BLEU signature, as results.json records them."""
        return Score(self.bleu, self.scores["chrf"].score, self.scores["bleu"].signature)


def decode_and_score(
    translator: Translator,
    data: EvalSet,
    options: SearchOptions,
    batch_size: int = 64,
    max_tokens: int | None = None,
    metrics: tuple[str, ...] = ("bleu", "chrf"),
) -> Decoded:
    """Translate ``data.sources`` with ``options`` and score them against the references."""
    best_only = dataclasses.replace(options, nbest=1)
    hyps = translator.translate(
        data.sources,
        best_only,
        batch_size=batch_size,
        max_tokens=max_tokens,
        tgt_lang=data.tgt_lang,
    )
    hyps = cast(list[str], hyps)  # nbest 1: one string per sentence
    return Decoded(best_only, hyps, score(hyps, data.references, metrics))


def mean_bleu(decoded: list[Decoded]) -> float:
    """The mean BLEU of several sets (a multilingual model's directions); of one, its BLEU."""
    return sum(d.bleu for d in decoded) / len(decoded)


def summary(decoded: list[Decoded]) -> Score:
    """One set's scores, or the mean BLEU and chrF of several, their signature prefixed with
    how many sets were averaged."""
    if len(decoded) == 1:
        return decoded[0].summary()
    chrf = sum(d.scores["chrf"].score for d in decoded) / len(decoded)
    signature = f"mean of {len(decoded)} sets|{decoded[0].scores['bleu'].signature}"
    return Score(mean_bleu(decoded), chrf, signature)


def decode_sets(
    translator: Translator,
    sets: list[EvalSet],
    options: SearchOptions,
    batch_size: int = 64,
    max_tokens: int | None = None,
    metrics: tuple[str, ...] = ("bleu", "chrf"),
) -> list[Decoded]:
    """:func:`decode_and_score` of each set."""
    return [decode_and_score(translator, s, options, batch_size, max_tokens, metrics) for s in sets]


def tune_alpha(
    translator: Translator,
    valid: list[EvalSet],
    options: SearchOptions,
    alphas: list[float],
    batch_size: int = 64,
    max_tokens: int | None = None,
    metrics: tuple[str, ...] = ("bleu", "chrf"),
) -> tuple[list[Decoded], dict[float, float]]:
    """Decode the ``valid`` sets (one, or a multilingual model's one per direction) at each α
    of ``alphas`` (the rest of the search as ``options``) and keep the α of the highest mean
    BLEU (the first of ties). Returns that decoding and the mean BLEU of every α."""
    if "bleu" not in metrics:
        metrics = ("bleu", *metrics)
    decoded = {
        a: decode_sets(
            translator,
            valid,
            dataclasses.replace(options, alpha=a),
            batch_size,
            max_tokens,
            metrics,
        )
        for a in alphas
    }
    best = max(alphas, key=lambda a: mean_bleu(decoded[a]))  # max keeps the first of ties
    return decoded[best], {a: mean_bleu(d) for a, d in decoded.items()}


def evaluate_checkpoint(
    translator: Translator,
    valid: list[EvalSet],
    tests: list[EvalSet],
    beam_size: int,
    alphas: list[float],
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> CheckpointResult:
    """Beam search on val at each α, then every test set at the val-best α only. With
    several val sets (a multilingual model's directions) α is chosen on their mean BLEU."""
    name = translator.checkpoint.name if translator.checkpoint else "model"
    chosen, grid = tune_alpha(
        translator, valid, SearchOptions(beam_size=beam_size), alphas, batch_size
    )
    options = chosen[0].options
    if len(alphas) > 1:
        log(
            f"{name}: {'val' if len(valid) > 1 else valid[0].name} BLEU by α "
            + ", ".join(f"{a:g}: {b:.2f}" for a, b in grid.items())
            + f"; test decoded at α {options.alpha:g}"
        )
    return CheckpointResult(
        step=int(translator.step or 0),
        beam_size=beam_size,
        alpha=options.alpha,
        valid=summary(chosen),
        test={
            t.name: decode_and_score(translator, t, options, batch_size).summary() for t in tests
        },
        alpha_grid={f"{a:g}": b for a, b in grid.items()} if len(alphas) > 1 else {},
        valid_sets={s.name: d.summary() for s, d in zip(valid, chosen, strict=True)}
        if len(valid) > 1
        else {},
    )


def choose_final(results: dict[str, CheckpointResult]) -> str:
    """The name of the checkpoint with the highest val BLEU (the first of ties)."""
    return max(results, key=lambda name: results[name].valid.bleu)
