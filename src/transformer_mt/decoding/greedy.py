"""Greedy decoding: at each step take the most probable allowed next token."""

from __future__ import annotations

import torch

from transformer_mt.decoding.search import (
    GREEDY,
    IncrementalDecoder,
    SearchOptions,
    apply_constraints,
    max_output_lengths,
)


@torch.inference_mode()
def greedy_search(
    model: IncrementalDecoder,
    src: torch.Tensor,  # (B, S) source ids, EOS-terminated, right-padded
    bos_id: int,
    eos_id: int,
    options: SearchOptions = GREEDY,
) -> list[list[int]]:
    """Greedy translations of a batch: one list of ids per sentence (without BOS/EOS).

    Applies the same length limits and n-gram blocking as beam search, so it equals beam
    search with a beam of 1.
    """
    memory, memory_mask = model.encode(src)
    batch = src.size(0)
    max_lens = max_output_lengths(
        src, model.pad_id, options.max_len_a, options.max_len_b, model.max_positions
    )
    cache = model.new_cache()
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    history = torch.empty(batch, 0, dtype=torch.long, device=src.device)
    special = (model.pad_id, bos_id, eos_id)
    for step in range(int(max_lens.max())):
        lprobs = model.decode_step(tokens, memory, memory_mask, cache, step)  # (B, V)
        apply_constraints(lprobs, history, step + 1 >= max_lens, step, special, options)
        tokens = lprobs.argmax(dim=-1)
        tokens = torch.where(finished, torch.full_like(tokens, model.pad_id), tokens)
        history = torch.cat([history, tokens[:, None]], dim=1)
        finished |= tokens == eos_id
        if bool(finished.all()):
            break
    return [[t for t in row if t not in (eos_id, model.pad_id)] for row in history.tolist()]
