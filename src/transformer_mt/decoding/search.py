"""What greedy and beam search share: their options, the interface they drive, output
length limits and n-gram blocking."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

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
    """

    beam_size: int = 5
    alpha: float = 2.2
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 1
    no_repeat_ngram: int = 0
    nbest: int = 1

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam size must be ≥ 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"nbest must be in [1, beam size {self.beam_size}], got {self.nbest}")
        if self.max_len_a < 0 or self.max_len_b < 0 or self.max_len_a + self.max_len_b <= 0:
            raise ValueError(
                f"max length a·src+b needs a, b ≥ 0 and not both 0 (a={self.max_len_a}, "
                f"b={self.max_len_b})"
            )
        if not is_length_penalty(self.alpha):
            raise ValueError(f"length penalty α must be finite and ≥ 0 (0 = off), got {self.alpha}")
        if self.min_len < 0 or self.no_repeat_ngram < 0:
            raise ValueError("min length and no-repeat n-gram size must be ≥ 0")

    def tag(self) -> str:
        """A short name for file names: "beam5", plus the settings that differ from the
        defaults, e.g. "beam5-alpha1-min_len3"."""
        changed = [
            f"{f.name}{getattr(self, f.name):g}"
            for f in fields(self)
            if f.name not in ("beam_size", "nbest") and getattr(self, f.name) != f.default
        ]
        return "-".join([f"beam{self.beam_size}", *changed])


BEAM = SearchOptions()  # beam 5, α 2.2
GREEDY = SearchOptions(beam_size=1)


class IncrementalDecoder(Protocol):
    """What a search needs from a model: encode once, then one cached step at a time."""

    pad_id: int
    max_positions: int

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def new_cache(self) -> list: ...

    def decode_step(
        self,
        last_tokens: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: list,
        step: int,
    ) -> torch.Tensor: ...

    @staticmethod
    def reorder_cache(cache: list, index: torch.Tensor) -> None: ...


def output_budget(
    src_lengths: torch.Tensor, max_len_a: float, max_len_b: int, max_positions: int
) -> torch.Tensor:
    """Output budget ``⌊a·source_length⌋ + b`` tokens (EOS included) per source length (EOS
    included), computed in float32 and capped to [1, max_positions]."""
    limit = (max_len_a * src_lengths.float()).long() + max_len_b
    return limit.clamp(min=1, max=max_positions)


def max_output_lengths(
    src: torch.Tensor, pad_id: int, max_len_a: float, max_len_b: int, max_positions: int
) -> torch.Tensor:
    """The :func:`output_budget` of each sentence of a padded batch ``src`` (B, S)."""
    return output_budget((src != pad_id).sum(dim=1), max_len_a, max_len_b, max_positions)


def block_repeated_ngrams(lprobs: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Set to -inf, in place, the log-prob of every token that would complete an n-gram
    already present in that row's ``history`` (B, t) of generated tokens."""
    if n <= 0 or history.size(1) < n:
        return
    rows: list[int] = []
    banned: list[int] = []
    for row, tokens in enumerate(history.tolist()):
        context = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i : i + n - 1]) == context:
                rows.append(row)
                banned.append(tokens[i + n - 1])
    if rows:
        lprobs[rows, banned] = -torch.inf


def apply_constraints(
    lprobs: torch.Tensor,  # (B, V), modified in place
    history: torch.Tensor,  # (B, t) tokens generated so far
    at_limit: torch.Tensor,  # (B,) bool: this step is the last the budget allows
    step: int,
    special: tuple[int, int, int],  # pad, bos, eos
    options: SearchOptions,
) -> None:
    """The rules every search applies to next-token log-probs: never PAD or BOS, no EOS
    before ``min_len``, no repeated n-grams, and only EOS once the budget is spent."""
    pad_id, bos_id, eos_id = special
    eos_lp = lprobs[:, eos_id].clone()
    lprobs[:, pad_id] = -torch.inf
    lprobs[:, bos_id] = -torch.inf
    if step + 1 < options.min_len:
        lprobs[:, eos_id] = -torch.inf
    block_repeated_ngrams(lprobs, history, options.no_repeat_ngram)
    if bool(at_limit.any()):  # out of budget: only EOS may follow (even before min_len)
        lprobs[at_limit] = -torch.inf
        lprobs[at_limit, eos_id] = eos_lp[at_limit]


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

    def new_cache(self) -> list:
        """Holds only the prefix decoded so far, (B, t)."""
        return [None]

    def decode_step(
        self,
        last_tokens: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: list,
        step: int,
    ) -> torch.Tensor:
        """Append ``last_tokens`` to the prefix, decode all of it again, and return the last
        position's log-probabilities (B, V)."""
        prefix = (
            last_tokens[:, None]
            if cache[0] is None
            else torch.cat([cache[0], last_tokens[:, None]], dim=1)
        )
        cache[0] = prefix
        logits = self.model.decode(prefix, memory, memory_mask)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    @staticmethod
    def reorder_cache(cache: list, index: torch.Tensor) -> None:
        """Keep the prefixes of rows ``index`` (beam search survivors)."""
        cache[0] = cache[0].index_select(0, index)
