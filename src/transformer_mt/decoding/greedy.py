"""Greedy decoding: at each step take the most probable allowed next token."""

from __future__ import annotations

import numpy as np
import torch

from transformer_mt.decoding.search import (
    GREEDY,
    IncrementalDecoder,
    SearchOptions,
    apply_constraints,
    argmax,
    leave_batch,
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
    search with a beam of 1. The argmax of the logits is that of the log-probabilities, so
    no softmax is computed. One host copy per step: the chosen tokens.
    """
    memory, memory_mask = model.encode(src)
    batch, device = src.size(0), src.device
    budget = max_output_lengths(
        src, model.pad_id, options.max_len_a, options.max_len_b, model.max_positions
    ).tolist()
    cache = model.start_decoding(memory, memory_mask, 1, max(budget))
    limits = np.array(budget)  # each sentence's budget
    alive = np.arange(batch)  # the sentence of each decoder row
    outputs: list[list[int]] = [[] for _ in range(batch)]
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    special = (model.pad_id, bos_id, eos_id)
    for step in range(max(budget)):
        logits = model.decode_step(tokens, cache)  # (R, V)
        history = [outputs[s] for s in alive] if options.no_repeat_ngram else []
        at_limit = np.nonzero(step + 1 >= limits[alive])[0].tolist()
        apply_constraints(logits, history, at_limit, step, special, options)
        tokens = argmax(logits)
        chosen = tokens.tolist()  # the step's one host copy
        for s, token in zip(alive.tolist(), chosen, strict=True):
            outputs[s].append(token)
        finished = np.array(chosen) == eos_id
        if finished.all():
            break
        if finished.any():  # finished sentences leave the batch
            order, (tokens,) = leave_batch(cache, finished, tokens)
            alive = alive[order]
    return [[t for t in out if t != eos_id] for out in outputs]
