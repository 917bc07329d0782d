"""Translate with a directory written by ``tmt-export`` (``tmt-translate --engine
ctranslate2``): CTranslate2's own search, with this project's options and scores.

Each call of :meth:`CTranslate2Translator.translate` makes one ``translate_batch`` call for
all its sentences, at the largest output budget among them. A greedy output over its own
sentence's budget is cut to it (the same tokens a search within the budget gives); a beam
search that reached a sentence's budget is done again within it (one more call per such
budget; rare with a trained model). This project's length-penalised scores are computed
from CTranslate2's log-probabilities; ``score_batch`` is called only for the rare
hypotheses whose log-probability CTranslate2 did not report (those cut by a budget).
Sampling (``SearchOptions.sample``) is CTranslate2's random sampling, seeded (see
:class:`CTranslate2Translator`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from transformer_mt.data.directions import language_pairs
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding.beam import length_penalty
from transformer_mt.decoding.search import BEAM, SearchOptions, output_budget
from transformer_mt.decoding.translator import encode_to_fit, source_prefix
from transformer_mt.errors import UserError
from transformer_mt.export.ctranslate2 import METADATA_FILE, SPM_FILE, import_ctranslate2

Scored = tuple[list[int], float]  # subword ids (no BOS/EOS) and the length-normalized score

# With α = 0, CTranslate2's beam search stops as soon as its best beam ends; any nonzero
# length penalty makes it go on until beam_size hypotheses are finished, this project's rule.
# 1e-6 changes CTranslate2's own ranking negligibly (and the hypotheses are rescored anyway).
NO_EARLY_EXIT = 1e-6


def read_metadata(path: Path) -> dict[str, Any]:
    """An export's ``transformer_mt.json``; UserError naming it if it is unreadable, not a
    JSON object, without a usable ``max_positions`` or ``pairs``, or with a ``tuned_alpha``
    that is not beam sizes ≥ 2 mapped to finite α ≥ 0 (an export written before that key
    has none: it is decoded at the default α)."""
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, truncated or invalid JSON
        raise UserError(f"{path}: unreadable export metadata: {e}") from e
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: not a JSON object but {type(metadata).__name__}")
    if "max_positions" not in metadata:
        raise UserError(f"{path}: no max_positions")
    positions = metadata["max_positions"]
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 2:
        raise UserError(f"{path}: max_positions must be an integer ≥ 2, got {positions!r}")
    try:
        language_pairs(metadata)
    except (UserError, TypeError) as e:  # pairs: not a list of "src-tgt" strings
        raise UserError(f"{path}: {e}") from e
    alphas = metadata.get("tuned_alpha", {})
    if not isinstance(alphas, dict) or not all(
        beam.isdecimal() and int(beam) > 1 and _is_alpha(alpha) for beam, alpha in alphas.items()
    ):
        raise UserError(
            f'{path}: tuned_alpha must map beam sizes ≥ 2 to α ≥ 0 (e.g. {{"5": 1.4}}), '
            f"got {alphas!r}"
        )
    return metadata


def _is_alpha(value: Any) -> bool:
    """Whether ``value`` is a JSON number usable as a length penalty: finite and ≥ 0."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


class CTranslate2Translator:
    """Translate raw sentences with an exported directory, the way :class:`Translator` does.

    Search options map onto ``translate_batch`` as follows:

    * ``beam_size`` → ``beam_size`` (1 = greedy), with ``patience=1``;
    * ``max_len_a``/``max_len_b``: the output budget of each sentence is
      ``⌊a·(source subwords + EOS)⌋ + b`` tokens, EOS included, capped to [1, max_positions],
      exactly as here. One ``translate_batch`` call decodes every sentence with
      ``max_decoding_length`` = the largest budget − 1 (CTranslate2 counts tokens without
      EOS); a greedy output longer than its own budget − 1 is cut to it (here the budget's
      last step may only emit EOS, so greedy outputs are the same tokens), and the sentences
      whose beam search reached their budget are searched again with their own; a hypothesis
      cut by its budget gets its log-probability, EOS included, from ``score_batch``;
    * ``min_len`` (EOS included) → ``min_decoding_length = min_len − 1`` (EOS excluded);
    * ``no_repeat_ngram`` → ``no_repeat_ngram_size``;
    * ``nbest`` → the number of hypotheses kept, ``num_hypotheses = beam_size``;
    * ``sample`` → ``beam_size=1``, ``num_hypotheses = nbest`` (independent samples),
      ``topk`` → ``sampling_topk`` (the same meaning: 0 = the whole distribution, 1 = the
      most probable token), ``topp`` → ``sampling_topp``, ``temperature`` →
      ``sampling_temperature``, ``seed`` → ``ctranslate2.set_random_seed``. PAD, BOS and
      the ``min_len``/n-gram rules are removed before the softmax, as :func:`sample_search`
      does, so both sample from the same distribution, but with other random numbers: the
      samples are not this project's. They are reproducible for the same seed, inputs and
      ``batch_size`` (CTranslate2 shares one random generator across a batch, so they
      depend on the batching). CTranslate2 seeds a worker thread's generator at its first
      draw: this object's first sampling call fixes its seed, later calls continue that
      stream, and asking for another seed is an error (load another object for it). With
      n-best, samples are scored (with ``score_batch``) and sorted by their log-probability
      under the model, the score of :func:`sample_search`; duplicates are kept;
    * ``alpha`` → ``length_penalty`` (or 1e-6 when α = 0), for CTranslate2's own ranking:
      it reports ``log P(Y + EOS) / (|Y| + 1)^α``, this project ranks by the GNMT
      ``log P(Y + EOS) / ((5 + |Y| + 1) / 6)^α``. So beam outputs (and every n-best list) are
      re-ranked by that score, computed from CTranslate2's log-probability: the score
      :func:`beam_search` gives. A nonzero penalty also makes CTranslate2 finish
      ``beam_size`` hypotheses, as here, instead of stopping once the best beam ends.

    PAD and BOS are never generated, as here: they are allowed in the one call (so that
    CTranslate2's log-probabilities are this project's) and the rare sentence that gets one
    is decoded again with them forbidden (``suppress_sequences``) and scored with
    ``score_batch``.

    Remaining differences, all in beam search (greedy search gives the same tokens):
    CTranslate2 removes forbidden tokens (EOS before ``min_len``, repeated n-grams, and PAD
    and BOS on a second pass) before the softmax and this project after it, so the
    cumulative scores that choose the surviving beams differ by that renormalization (those
    hypotheses are scored with ``score_batch``, so the returned scores are exact); on the
    budget's last step CTranslate2 finishes the top ``beam_size`` candidates as they are,
    where this project first refills the beam with non-EOS candidates and then forces EOS
    (and a sentence decoded past its budget is cut, not searched within it); and when more
    than ``beam_size`` hypotheses are finished, CTranslate2 keeps the best by its own
    normalized score, this project the first ones finished.
    """

    def __init__(
        self,
        translator: Any,
        tokenizer: Tokenizer,
        max_positions: int,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.translator = translator
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.data = data or {}  # the languages: src_lang, tgt_lang, pairs (multilingual)
        self.pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        self.piece_ids = {p: i for i, p in enumerate(self.pieces)}
        self.seed: int | None = None  # the sampling seed in effect (set at the first sample)

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str = "cpu",
        compute_type: str = "default",
        intra_threads: int = 0,
        inter_threads: int = 1,
    ) -> CTranslate2Translator:
        """Load a directory written by :func:`export_ctranslate2`, to decode with
        ``inter_threads`` workers (batches in parallel) of ``intra_threads`` threads each
        (0: CTranslate2's default)."""
        path = Path(path)
        meta_path = path / METADATA_FILE
        if not meta_path.is_file() or not (path / SPM_FILE).is_file():
            raise UserError(f"{path} is not a transformer_mt CTranslate2 export")
        metadata = read_metadata(meta_path)
        try:
            tokenizer = Tokenizer((path / SPM_FILE).read_bytes())
        except (OSError, RuntimeError) as e:  # unreadable, or not a SentencePiece model
            raise UserError(f"{path / SPM_FILE}: not a readable SentencePiece model: {e}") from e
        ct2 = import_ctranslate2()
        try:
            translator = ct2.Translator(
                str(path),
                device=device,
                compute_type=compute_type,
                intra_threads=intra_threads,
                inter_threads=inter_threads,
            )
        except (RuntimeError, ValueError) as e:  # unknown device/compute type, no CUDA ...
            raise UserError(f"CTranslate2 cannot load {path} on {device}: {e}") from e
        return cls(translator, tokenizer, metadata["max_positions"], metadata)

    def tuned_alpha(self, beam_size: int) -> float | None:
        """The length penalty the exported checkpoint's run chose on val for ``beam_size``,
        as ``tmt-export`` recorded it; None for greedy search, a beam size it was not tuned
        for, or an export written before ``tuned_alpha`` was recorded."""
        if beam_size == 1:
            return None
        alpha = self.data.get("tuned_alpha", {}).get(str(beam_size))
        return None if alpha is None else float(alpha)

    def default_options(self) -> SearchOptions:
        """Beam 5 at the α the run chose on val (:meth:`tuned_alpha`), else the default α: as
        :class:`~transformer_mt.decoding.Translator` decodes when given no options."""
        alpha = self.tuned_alpha(BEAM.beam_size)
        return BEAM if alpha is None else dataclasses.replace(BEAM, alpha=alpha)

    def translate(
        self,
        sentences: list[str],
        options: SearchOptions | None = None,
        *,
        batch_size: int = 64,
        tgt_lang: str | None = None,
        on_truncate: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Detokenized best translations, one per input sentence, in input order (into
        ``tgt_lang``, for a multilingual model). A sentence longer than the model's positions
        is truncated to fit, and ``on_truncate(index, n_subwords)`` is called (by default a
        warning on stderr), as :meth:`Translator.translate_ids` does. Without ``options``,
        :meth:`default_options`."""
        options = options or self.default_options()
        rank = options.beam_size > 1
        best = self._search(sentences, options, batch_size, rank, tgt_lang, on_truncate)
        return self.tokenizer.decode([hyps[0][0] for hyps in best])

    def translate_nbest(
        self,
        sentences: list[str],
        options: SearchOptions | None = None,
        *,
        batch_size: int = 64,
        tgt_lang: str | None = None,
        on_truncate: Callable[[int, int], None] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Per sentence, up to ``options.nbest`` (translation, score) pairs, best first; the
        score is the log-probability (EOS included) over the GNMT length penalty. Truncation
        and ``on_truncate`` as in :meth:`translate`; without ``options``,
        :meth:`default_options`."""
        options = options or self.default_options()
        results = self._search(sentences, options, batch_size, True, tgt_lang, on_truncate)
        nbest = []
        for hyps in results:
            texts = self.tokenizer.decode([ids for ids, _ in hyps])
            nbest.append([(text, score) for text, (_, score) in zip(texts, hyps, strict=True)])
        return nbest

    def budgets(self, source_lengths: list[int], options: SearchOptions) -> list[int]:
        """Output tokens allowed, EOS included, for sources of ``source_lengths`` tokens (EOS
        included): ``⌊a·length⌋ + b`` in float32 like the PyTorch search, capped."""
        lengths = torch.tensor(source_lengths, dtype=torch.long)
        return output_budget(
            lengths, options.max_len_a, options.max_len_b, self.max_positions
        ).tolist()

    def _search(
        self,
        sentences: list[str],
        options: SearchOptions,
        batch_size: int,
        rank: bool,
        tgt_lang: str | None = None,
        on_truncate: Callable[[int, int], None] | None = None,
    ) -> list[list[Scored]]:
        """Decode every sentence in one ``translate_batch`` call; with ``rank``, score each
        hypothesis as :func:`beam_search` does and sort each list best first."""
        prefix = source_prefix(self.tokenizer, self.data, tgt_lang)
        ids = encode_to_fit(self.tokenizer, sentences, self.max_positions, on_truncate, prefix)
        results: list[list[Scored]] = [[([], 0.0)] for _ in sentences]
        budgets = self.budgets([len(s) + 1 for s in ids], options)
        todo = [i for i, s in enumerate(ids) if s and budgets[i] > 1]  # else: only EOS fits
        if not todo:
            return results
        sources = [[self.pieces[t] for t in ids[i]] for i in todo]
        limits = [budgets[i] - 1 for i in todo]  # output tokens before the EOS
        # CTranslate2 removes forbidden tokens before its softmax: its log-probabilities are
        # this project's only when it forbids nothing (no min_len, no n-gram blocking). Samples
        # are drawn with PAD and BOS forbidden at once, as sample_search draws them.
        exact = options.min_len <= 1 and options.no_repeat_ngram == 0 and not options.sample
        if options.sample:
            self._seed(options.seed)
        found = self._decode(sources, max(limits), options, batch_size, suppress=not exact)
        if options.beam_size > 1:  # beams that ran past a sentence's budget searched otherwise
            past = [j for j, hyps in enumerate(found) if any(len(h) >= limits[j] for h, _ in hyps)]
            for limit in sorted({limits[j] for j in past}):
                group = [j for j in past if limits[j] == limit]
                redone = self._decode(
                    [sources[j] for j in group], limit, options, batch_size, suppress=not exact
                )
                for j, hyps in zip(group, redone, strict=True):
                    found[j] = hyps
        rescore = set() if exact else set(range(len(todo)))
        if exact:  # PAD and BOS were allowed: decode again, forbidding them, where they came
            specials = {self.tokenizer.pad_id, self.tokenizer.bos_id}
            again = [j for j, hyps in enumerate(found) if any(specials & set(h) for h, _ in hyps)]
            if again:
                redone = self._decode(
                    [sources[j] for j in again],
                    max(limits[j] for j in again),
                    options,
                    batch_size,
                    suppress=True,
                )
                for j, hyps in zip(again, redone, strict=True):
                    found[j] = hyps
                rescore.update(again)
        if rank:
            found = self._rank(sources, found, limits, rescore, options, batch_size)
        for i, hyps, limit in zip(todo, found, limits, strict=True):
            results[i] = [(tokens[:limit], score) for tokens, score in hyps[: options.nbest]]
        return results

    def _seed(self, seed: int) -> None:
        """Seed CTranslate2's random generator before this object's first sample."""
        if self.seed is None:
            ct2 = import_ctranslate2()
            if not hasattr(ct2, "set_random_seed"):
                raise UserError(
                    f"CTranslate2 {ct2.__version__} has no set_random_seed: it cannot sample "
                    "reproducibly; upgrade it or use --engine torch"
                )
            ct2.set_random_seed(seed)
            self.seed = seed
        elif seed != self.seed:
            raise UserError(
                f"CTranslate2 samples with seed {self.seed} in this process (its threads seed "
                f"once); load the export again to sample with seed {seed}"
            )

    def _decode(
        self,
        sources: list[list[str]],
        max_length: int,
        options: SearchOptions,
        batch_size: int,
        suppress: bool,
    ) -> list[list[Scored]]:
        """One ``translate_batch`` call: per source, its hypotheses as (ids, CTranslate2's
        score) (see the class docstring for its normalization); ``suppress`` forbids PAD
        and BOS."""
        beam = options.beam_size
        hypotheses = options.nbest if options.sample else beam
        tok = self.tokenizer
        specials = [[self.pieces[tok.pad_id]], [self.pieces[tok.bos_id]]]
        outputs = self.translator.translate_batch(
            sources,
            max_batch_size=batch_size,
            beam_size=beam,
            patience=1,
            num_hypotheses=hypotheses,
            length_penalty=options.alpha or NO_EARLY_EXIT,
            no_repeat_ngram_size=options.no_repeat_ngram,
            suppress_sequences=specials if suppress else None,
            max_input_length=0,
            max_decoding_length=max_length,
            min_decoding_length=min(max(options.min_len - 1, 0), max_length),
            return_scores=True,
            sampling_topk=options.topk if options.sample else 1,
            sampling_topp=options.topp,
            sampling_temperature=options.temperature,
        )
        return [
            [
                ([self.piece_ids[p] for p in hyp], score)
                for hyp, score in zip(r.hypotheses, r.scores, strict=True)
            ]
            for r in outputs
        ]

    def _rank(
        self,
        sources: list[list[str]],
        found: list[list[Scored]],
        limits: list[int],
        rescore: set[int],
        options: SearchOptions,
        batch_size: int,
    ) -> list[list[Scored]]:
        """Each hypothesis scored as :func:`beam_search` does, log P(Y + EOS) over the GNMT
        penalty of |Y| + 1 (samples: log P alone), and each list sorted best first (one
        hypothesis per token sequence; samples: all kept). log P comes from CTranslate2's
        score, or from one ``score_batch`` call for the hypotheses of the sentences
        ``rescore`` and those that reached or passed their sentence's limit without EOS."""
        alpha = 0.0 if options.sample else options.alpha
        ct2_alpha = options.alpha or NO_EARLY_EXIT
        log_probs: list[list[float | None]] = []
        cut: list[tuple[int, int]] = []  # (sentence, hypothesis) to score again
        for s, (hyps, limit) in enumerate(zip(found, limits, strict=True)):
            row: list[float | None] = []
            for h, (tokens, score) in enumerate(hyps):
                if s in rescore or len(tokens) >= limit:  # no EOS within the budget: cut
                    cut.append((s, h))
                    row.append(None)
                else:
                    row.append(score * (len(tokens) + 1) ** ct2_alpha)
            log_probs.append(row)
        if cut:
            scored = self.translator.score_batch(
                [sources[s] for s, _ in cut],
                [[self.pieces[t] for t in found[s][h][0][: limits[s]]] for s, h in cut],
                max_batch_size=batch_size,
                max_input_length=0,
            )
            for (s, h), result in zip(cut, scored, strict=True):
                log_probs[s][h] = sum(result.log_probs)
        ranked = []
        for s, hyps in enumerate(found):
            best: dict[tuple[int, ...], Scored] = {}
            samples: list[Scored] = []
            for (tokens, _), log_prob in zip(hyps, log_probs[s], strict=True):
                kept = tokens[: limits[s]]
                assert log_prob is not None
                score = log_prob / length_penalty(len(kept) + 1, alpha)
                samples.append((kept, score))
                if tuple(kept) not in best or score > best[tuple(kept)][1]:
                    best[tuple(kept)] = (kept, score)
            ranked.append(sorted(samples if options.sample else best.values(), key=lambda h: -h[1]))
        return ranked
