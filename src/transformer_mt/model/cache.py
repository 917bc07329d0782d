"""The key/value cache of incremental decoding (inference).

The decoder produces one target position per step. Its self-attention needs the keys and
values of every earlier position: they are written once into a buffer preallocated for the
whole output budget, never concatenated. Its cross-attention needs the source's keys and
values: they are computed once per batch, one copy per sentence, shared by the sentence's
``group`` consecutive decoder rows (its beam hypotheses), so reordering hypotheses never
touches them; they change only when finished sentences leave the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys and values of one batch being decoded: R decoder rows for N sentences (R = N·G)."""

    self_kv: torch.Tensor  # (L, 2, R_0, H, T_max, d_k): decoded positions; rows [:R] in use
    source_kv: torch.Tensor  # (L, 2, N, H, S, d_k): the source's, for cross-attention
    source_bias: torch.Tensor  # (N, 1, 1, S): 0 at source tokens, -inf at padding
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]]  # per layer: Q, K, V weights stacked
    project: Callable[[torch.Tensor], torch.Tensor]  # decoder states (R, d) -> logits (R, V)
    group: int = 1  # decoder rows per sentence (the beam size)
    rows: int = 0  # decoder rows in use
    length: int = 0  # positions decoded so far

    def layer_self(self, layer: int) -> torch.Tensor:
        """(2, R, H, T_max, d_k): layer ``layer``'s self-attention keys and values."""
        return self.self_kv[layer, :, : self.rows]

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Beam reordering: row ``dst[i]`` takes over the decoded prefix of row ``src[i]``.

        Only rows whose hypothesis changed are copied. No row in ``dst`` may be in ``src``:
        a row that another hypothesis takes over is one no survivor descends from."""
        if dst.numel():
            past = self.self_kv[:, :, :, :, : self.length]  # (L, 2, R_0, H, t, d_k)
            past.index_copy_(2, dst, past.index_select(2, src))

    def keep(self, rows: torch.Tensor, sentences: torch.Tensor) -> None:
        """Keep decoder rows ``rows`` and source rows ``sentences`` (finished sentences leave
        the batch), in that order."""
        t = self.length
        kept = self.self_kv[:, :, :, :, :t].index_select(2, rows)  # (L, 2, R', H, t, d_k)
        self.self_kv[:, :, : rows.numel(), :, :t] = kept
        self.rows = rows.numel()
        self.source_kv = self.source_kv.index_select(2, sentences)
        self.source_bias = self.source_bias.index_select(0, sentences)
