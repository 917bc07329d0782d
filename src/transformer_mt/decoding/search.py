"""What greedy and beam search share: the interface they drive and output length limits."""

from __future__ import annotations

from typing import Protocol

import torch


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


def max_output_lengths(
    src: torch.Tensor, pad_id: int, max_len_a: float, max_len_b: int, max_positions: int
) -> torch.Tensor:
    """Per-sentence output budget ``a·source_length + b`` tokens (EOS included), capped by positions."""
    src_len = (src != pad_id).sum(dim=1)
    limit = (max_len_a * src_len.float()).long() + max_len_b
    return limit.clamp(min=1, max=max_positions)
