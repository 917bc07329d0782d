"""Greedy decoding: at each step take the most probable next token."""

from __future__ import annotations

import torch

from transformer_mt.decoding.search import IncrementalDecoder, max_output_lengths


@torch.inference_mode()
def greedy_search(
    model: IncrementalDecoder,
    src: torch.Tensor,  # (B, S) source ids, EOS-terminated, right-padded
    bos_id: int,
    eos_id: int,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[int]]:
    """Greedy translations of a batch: one list of ids per sentence (without BOS/EOS)."""
    memory, memory_mask = model.encode(src)
    batch = src.size(0)
    max_lens = max_output_lengths(src, model.pad_id, max_len_a, max_len_b, model.max_positions)
    cache = model.new_cache()
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    steps: list[torch.Tensor] = []
    for step in range(int(max_lens.max())):
        lprobs = model.decode_step(tokens, memory, memory_mask, cache, step)  # (B, V)
        lprobs[:, model.pad_id] = -torch.inf
        lprobs[:, bos_id] = -torch.inf
        tokens = lprobs.argmax(dim=-1)
        tokens = torch.where(step + 1 >= max_lens, torch.full_like(tokens, eos_id), tokens)
        tokens = torch.where(finished, torch.full_like(tokens, model.pad_id), tokens)
        steps.append(tokens)
        finished |= tokens == eos_id
        if bool(finished.all()):
            break
    out = torch.stack(steps, dim=1).tolist()  # (B, T)
    return [[t for t in row if t not in (eos_id, model.pad_id)] for row in out]
