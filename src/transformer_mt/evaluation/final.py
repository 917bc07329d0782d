"""The final evaluation of a checkpoint: the length penalty α tuned on val, test decoded at
the chosen α only, and the choice between a run's checkpoints by val BLEU.

``tmt-train`` runs it on ``best.pt`` and ``averaged.pt`` at the end of training;
``tmt-evaluate --alpha-grid`` runs the same α search. Test sets never influence a choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import Translator
from transformer_mt.evaluation.metrics import MetricScore, score
from transformer_mt.formats.results import CheckpointResult, Score


@dataclass
class EvalSet:
    """Source sentences and one reference each, named for reports (e.g. "val")."""

    name: str
    sources: list[str]
    references: list[str]


@dataclass
class Decoded:
    """Hypotheses of one set and their scores."""

    options: SearchOptions
    hypotheses: list[str]
    scores: dict[str, MetricScore]

    @property
    def bleu(self) -> float:
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
        data.sources, best_only, batch_size=batch_size, max_tokens=max_tokens
    )
    hyps = cast(list[str], hyps)  # nbest 1: one string per sentence
    return Decoded(best_only, hyps, score(hyps, data.references, metrics))


def tune_alpha(
    translator: Translator,
    valid: EvalSet,
    options: SearchOptions,
    alphas: list[float],
    batch_size: int = 64,
    max_tokens: int | None = None,
    metrics: tuple[str, ...] = ("bleu", "chrf"),
) -> tuple[Decoded, dict[float, float]]:
    """Decode ``valid`` at each α of ``alphas`` (the rest of the search as ``options``) and
    keep the α of the highest BLEU (the first of ties). Returns that decoding and the BLEU
    of every α."""
    if "bleu" not in metrics:
        metrics = ("bleu", *metrics)
    decoded = {
        a: decode_and_score(
            translator,
            valid,
            dataclasses.replace(options, alpha=a),
            batch_size,
            max_tokens,
            metrics,
        )
        for a in alphas
    }
    best = max(alphas, key=lambda a: decoded[a].bleu)  # max keeps the first of ties
    return decoded[best], {a: d.bleu for a, d in decoded.items()}


def evaluate_checkpoint(
    translator: Translator,
    valid: EvalSet,
    tests: list[EvalSet],
    beam_size: int,
    alphas: list[float],
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> CheckpointResult:
    """Beam search on val at each α, then every test set at the val-best α only."""
    name = translator.checkpoint.name if translator.checkpoint else "model"
    chosen, grid = tune_alpha(
        translator, valid, SearchOptions(beam_size=beam_size), alphas, batch_size
    )
    if len(alphas) > 1:
        log(
            f"{name}: {valid.name} BLEU by α "
            + ", ".join(f"{a:g}: {b:.2f}" for a, b in grid.items())
            + f"; test decoded at α {chosen.options.alpha:g}"
        )
    return CheckpointResult(
        step=int(translator.step or 0),
        beam_size=beam_size,
        alpha=chosen.options.alpha,
        valid=chosen.summary(),
        test={
            t.name: decode_and_score(translator, t, chosen.options, batch_size).summary()
            for t in tests
        },
        alpha_grid={f"{a:g}": b for a, b in grid.items()} if len(alphas) > 1 else {},
    )


def choose_final(results: dict[str, CheckpointResult]) -> str:
    """The name of the checkpoint with the highest val BLEU (the first of ties)."""
    return max(results, key=lambda name: results[name].valid.bleu)
