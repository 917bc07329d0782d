"""What greedy search, beam search and sampling share: their options, the interface they
drive, output length limits and n-gram blocking."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch

from transformer_mt.model import Transformer


def is_length_penalty(alpha: object) -> bool:
    """Whether ``alpha`` is a usable GNMT length penalty: a number (not a bool), finite, ≥ 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        return False
    return 0.0 <= alpha < math.inf  # NaN fails too


@dataclass(frozen=True)
class SearchOptions:
    """How to search; the decoding flags of tmt-translate and tmt-evaluate map onto these.

    The output budget of a sentence is ``max_len_a · source_length + max_len_b`` tokens, EOS
    included (capped by the model's positions). EOS is not allowed before ``min_len`` tokens
    (unless the budget runs out). ``no_repeat_ngram`` > 0 forbids any n-gram of that size
    from appearing twice in a hypothesis. ``alpha`` is the GNMT length penalty (0 = rank by
    raw log-probability). ``beam_size`` 1 is greedy search. The default α, 2.2, was tuned on
    Multi30k val, where this project's models write short beam outputs; test_2016_flickr's
    references are shorter, and there it does not help (docs/experiments.md, "Length penalty").

    ``sample`` draws each token instead (:func:`~transformer_mt.decoding.sampling.sample_search`,
    for back-translation): from softmax(logits / ``temperature``), restricted to the ``topk``
    most probable tokens (0 = all) and then to the nucleus of mass ``topp`` (1 = all); the
    random streams derive from ``seed``; ``nbest`` samples per sentence. It needs
    ``beam_size`` 1 and ignores ``alpha``; the sampling fields need ``sample``.
    """

    beam_size: int = 5
    alpha: float = 2.2
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 1
    no_repeat_ngram: int = 0
    nbest: int = 1
    sample: bool = False
    topk: int = 0
    topp: float = 1.0
    temperature: float = 1.0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam size must be ≥ 1, got {self.beam_size}")
        if self.sample:
            if self.beam_size != 1:
                raise ValueError(
                    f"sampling draws one token per step: beam size must be 1, got {self.beam_size}"
                )
            if self.nbest < 1:
                raise ValueError(f"nbest (samples per sentence) must be ≥ 1, got {self.nbest}")
        elif not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"nbest must be in [1, beam size {self.beam_size}], got {self.nbest}")
        self._check_sampling()
        if not math.isfinite(self.max_len_a):
            raise ValueError(
                f"max_len_a (output budget a·src+b) must be finite, got {self.max_len_a}"
            )
        if self.max_len_a < 0 or self.max_len_b < 0 or self.max_len_a + self.max_len_b <= 0:
            raise ValueError(
                f"max length a·src+b needs a, b ≥ 0 and not both 0 (a={self.max_len_a}, "
                f"b={self.max_len_b})"
            )
        if not is_length_penalty(self.alpha):
            raise ValueError(f"length penalty α must be finite and ≥ 0 (0 = off), got {self.alpha}")
        if self.min_len < 0 or self.no_repeat_ngram < 0:
            raise ValueError("min length and no-repeat n-gram size must be ≥ 0")

    def _check_sampling(self) -> None:
        """The sampling fields: in range, and left at their defaults unless ``sample``."""
        if not 0.0 < self.temperature < math.inf:  # NaN fails too
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if not 0.0 < self.topp <= 1.0:
            raise ValueError(f"topp (nucleus mass) must be in (0, 1] (1 = off), got {self.topp}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"topk must be an integer ≥ 0 (0 = off), got {self.topk}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer ≥ 0, got {self.seed}")
        if not self.sample:
            for name in SAMPLING_FIELDS:
                if getattr(self, name) != getattr(SearchOptions, name):
                    raise ValueError(f"{name} applies only to sampling (sample=True)")

    def tag(self) -> str:
        """A short name for file names: "beam5", plus the settings that differ from the
        defaults, e.g. "beam5-alpha1-min_len3"; for sampling "sample", e.g.
        "sample-topk10-seed2"."""
        skip = ("beam_size", "nbest", "sample", *(("alpha",) if self.sample else ()))
        changed = [
            f"{f.name}{getattr(self, f.name):g}"
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) != f.default
        ]
        return "-".join(["sample" if self.sample else f"beam{self.beam_size}", *changed])


SAMPLING_FIELDS = ("topk", "topp", "temperature", "seed")  # used only when sampling


BEAM = SearchOptions()  # beam 5, α 2.2
GREEDY = SearchOptions(beam_size=1)


class DecodingCache(Protocol):
    """What a search does to the state of a batch being decoded."""

    def keep(self, rows: np.ndarray, sentences: np.ndarray) -> None:
        """Row ``i`` takes over the decoded prefix of row ``rows[i]`` (beam reordering; a row
        may be taken by several: a prefix spread to several hypotheses) and sentence ``i``
        the source of sentence ``sentences[i]`` (finished sentences leave the batch)."""


class IncrementalDecoder(Protocol):
    """What a search needs from a model: encode once, then one cached step at a time."""

    pad_id: int
    max_positions: int

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output (B, S, d) and its padding mask (B, 1, 1, S)."""

    def start_decoding(
        self, memory: torch.Tensor, memory_mask: torch.Tensor, group: int, max_steps: int
    ) -> DecodingCache:
        """A cache of ``group`` rows per sentence (``keep`` may narrow it and spread it back)."""
        ...

    def decode_step(self, last_tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        """Next-token logits (R, V): fp32, contiguous, the caller's to modify in place."""
        ...


def output_budget(
    src_lengths: torch.Tensor, max_len_a: float, max_len_b: int, max_positions: int
) -> torch.Tensor:
    """Output budget ``⌊a·source_length⌋ + b`` tokens (EOS included) per source length (EOS
    included), computed in float32 and capped to [1, max_positions] (each term is capped
    before the cast, so that a huge ``a`` or ``b`` cannot overflow int64)."""
    scaled = (max_len_a * src_lengths.float()).clamp(max=max_positions)
    limit = scaled.long() + min(max_len_b, max_positions)
    return limit.clamp(min=1, max=max_positions)


def max_output_lengths(
    src: torch.Tensor, pad_id: int, max_len_a: float, max_len_b: int, max_positions: int
) -> torch.Tensor:
    """The :func:`output_budget` of each sentence of a padded batch ``src`` (B, S)."""
    return output_budget((src != pad_id).sum(dim=1), max_len_a, max_len_b, max_positions)


def block_repeated_ngrams(lprobs: torch.Tensor, history: Sequence[Sequence[int]], n: int) -> None:
    """Set to -inf, in place, the log-prob of every token that would complete an n-gram
    already present in its row's ``history`` (the tokens generated so far, one list a row;
    rows may differ in length)."""
    if n <= 0:
        return
    rows: list[int] = []
    banned: list[int] = []
    for row, tokens in enumerate(history):
        if len(tokens) < n:
            continue
        context = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i : i + n - 1]) == context:
                rows.append(row)
                banned.append(tokens[i + n - 1])
    if rows:
        device = lprobs.device
        lprobs[to_device(np.array(rows), device), to_device(np.array(banned), device)] = -torch.inf


def compaction_order(stay: np.ndarray) -> np.ndarray:
    """Which entries fill the first ``m`` positions when the ``m`` entries marked in ``stay``
    (bool, one per position) are kept: those already among the first ``m`` stay where they
    are, the others move into the gaps in order. Caches copy only the entries that move."""
    kept = np.nonzero(stay)[0]
    m = kept.size
    order = np.arange(m)
    gaps = np.nonzero(~stay[:m])[0]
    order[gaps] = kept[kept >= m]  # as many kept entries beyond m as gaps before it
    return order


def leave_batch(
    cache: DecodingCache, finished: np.ndarray, *rows: torch.Tensor
) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Finished decoder rows (``finished``: bool, one per row) leave the batch of a search with
    one row per sentence: the cache keeps the others, the last ones moved into the gaps.
    Returns the kept rows' former positions and each of ``rows`` (per-row tensors) kept."""
    order = compaction_order(~finished)
    cache.keep(order, order)
    return order, [t.index_select(0, to_device(order, t.device)) for t in rows]


def to_device(values: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Host numbers -> a tensor on ``device``, copied without waiting for the device."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(device, non_blocking=True)


def apply_constraints(
    lprobs: torch.Tensor,  # (R, V) log-probs or logits, modified in place
    history: Sequence[Sequence[int]],  # the tokens generated so far, one list a row
    at_limit: list[int],  # rows for which this step is the last the budget allows
    step: int,
    special: tuple[int, int, int],  # pad, bos, eos
    options: SearchOptions,
) -> None:
    """The rules every search applies to next-token scores: never PAD or BOS, no EOS before
    ``min_len``, no repeated n-grams, and only EOS once the budget is spent (with its own
    score, even before ``min_len``)."""
    pad_id, bos_id, eos_id = special
    limit_rows = to_device(np.array(at_limit, dtype=np.int64), lprobs.device) if at_limit else None
    eos_lp = None if limit_rows is None else lprobs[limit_rows, eos_id]  # a copy, taken first
    lprobs[:, pad_id] = -torch.inf
    lprobs[:, bos_id] = -torch.inf
    if step + 1 < options.min_len:
        lprobs[:, eos_id] = -torch.inf
    block_repeated_ngrams(lprobs, history, options.no_repeat_ngram)
    if limit_rows is not None:
        lprobs.index_fill_(0, limit_rows, -torch.inf)
        lprobs[limit_rows, eos_id] = eos_lp


@functools.lru_cache(maxsize=64)
def _block_size(m: int, lo: int = 64, hi: int = 512) -> int | None:
    """The block length of the two-pass reductions over rows of ``m`` entries: a divisor of
    ``m`` in [lo, hi] leaving at least 4 blocks, the multiple of 32 nearest 160 if there is
    one (the CPU's maximum over blocks of 32·k floats is several times faster than over other
    lengths: 29 µs for 64 rows of 8,000 in blocks of 160 against 118 µs in blocks of 80), else
    the largest; else None (the reductions are then torch's own)."""
    divisors = [b for b in range(lo, min(hi, m // 4) + 1) if m % b == 0]
    aligned = [b for b in divisors if b % 32 == 0]
    if aligned:
        return min(aligned, key=lambda b: abs(b - 160))
    return divisors[-1] if divisors else None


def _block_rows(x: torch.Tensor, b: int, which: torch.Tensor) -> torch.Tensor:
    """Of (n, m) ``x`` in blocks of ``b``, the blocks ``which`` (n, k) of each row, as
    (n, k·b): one ``index_select`` of whole blocks (a ``gather`` of their entries is slower)."""
    n, m = x.shape
    per_row = m // b
    rows = which + torch.arange(0, n * per_row, per_row, device=x.device)[:, None]  # (n, k)
    return x.reshape(n * per_row, b).index_select(0, rows.view(-1)).view(n, -1)


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=1)`` of a (n, m) tensor: the k largest of each row, sorted,
    and their indices (which may differ only among exactly equal values).

    A long row is read in two passes: the maximum of each block (``_block_size``: 160
    entries for the usual vocabularies), then a top-k over the k blocks with the largest
    maxima (they hold the row's k largest entries). On a CPU this takes a fraction of
    ``torch.topk``'s time at beam-search sizes.
    """
    n, m = x.shape
    b = _block_size(m)
    if b is None or m < 4 * k * b:
        return x.topk(k, dim=1)
    _, which = x.view(n, m // b, b).amax(dim=2).topk(k, dim=1)  # (n, k) blocks
    values, i = _block_rows(x, b, which).topk(k, dim=1)  # among their k·b entries
    return values, which.gather(1, i // b) * b + i % b


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=1)`` of a (n, m) tensor (the first of equal maxima), in two passes:
    the maximum of each block, then the first block holding the row's maximum. On a CPU
    ``argmax`` over long rows is many times slower than ``amax``."""
    n, m = x.shape
    b = _block_size(m)
    if b is None:
        return x.argmax(dim=1)
    which = x.view(n, m // b, b).amax(dim=2).argmax(dim=1)  # (n,) first block with the max
    return which * b + _block_rows(x, b, which[:, None]).argmax(dim=1)


@dataclass
class PrefixCache:
    """The state of :class:`UncachedDecoder`: the prefixes decoded so far and the source."""

    prefix: torch.Tensor  # (R, t) tokens fed so far (BOS first)
    memory: torch.Tensor  # (N, S, d)
    memory_mask: torch.Tensor  # (N, 1, 1, S)

    def keep(self, rows: np.ndarray, sentences: np.ndarray) -> None:
        """Keep prefixes ``rows`` and sources ``sentences``."""
        rows_t, sentences_t = (
            to_device(rows, self.prefix.device),
            to_device(sentences, self.prefix.device),
        )
        self.prefix = self.prefix.index_select(0, rows_t)
        self.memory = self.memory.index_select(0, sentences_t)
        self.memory_mask = self.memory_mask.index_select(0, sentences_t)


class UncachedDecoder:
    """A model driven without the key/value cache: every step re-decodes the whole prefix.

    It gives the same outputs as cached decoding, at O(T²) cost; it exists to check that
    (tests) and to measure what the cache buys (``make bench-decode``).
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.pad_id = model.pad_id
        self.max_positions = model.max_positions

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's encoder output and source mask."""
        return self.model.encode(src)

    def start_decoding(
        self, memory: torch.Tensor, memory_mask: torch.Tensor, group: int, max_steps: int
    ) -> PrefixCache:
        """No prefix yet; ``group`` rows per sentence."""
        rows = memory.size(0) * group
        prefix = torch.empty(rows, 0, dtype=torch.long, device=memory.device)
        return PrefixCache(prefix, memory, memory_mask)

    def decode_step(self, last_tokens: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """Append ``last_tokens`` to the prefixes, decode all of them again, and return the
        last position's logits (R, V)."""
        cache.prefix = torch.cat([cache.prefix, last_tokens[:, None]], dim=1)
        g = cache.prefix.size(0) // cache.memory.size(0)  # rows per sentence
        memory = cache.memory.repeat_interleave(g, dim=0)
        mask = cache.memory_mask.repeat_interleave(g, dim=0)
        return self.model.decode(cache.prefix, memory, mask)[:, -1].float().contiguous()
