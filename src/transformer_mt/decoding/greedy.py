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
    compaction_order,
    max_output_lengths,
    to_device,
)

# Finished sentences leave the batch once they are at least this fraction of it: each
# removal moves rows of the cache and costs a few operations, more than one finished row
# decoding on for a few steps.
COMPACT_FRACTION = 0.125


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
    alive = list(range(batch))  # the sentence of each decoder row
    running = list(alive)  # rows still decoding (a finished row decodes on until compaction)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    special = (model.pad_id, bos_id, eos_id)
    for step in range(max(budget)):
        logits = model.decode_step(tokens, cache)  # (R, V)
        history = [outputs[s] for s in alive] if options.no_repeat_ngram else []
        at_limit = [r for r, s in enumerate(alive) if step + 1 >= budget[s]]
        apply_constraints(logits, history, at_limit, step, special, options)
        tokens = argmax(logits)
        chosen = tokens.tolist()  # the step's one host copy
        for r in running:
            outputs[alive[r]].append(chosen[r])
        running = [r for r in running if chosen[r] != eos_id]
        if not running:
            break
        if len(alive) - len(running) >= max(1, COMPACT_FRACTION * len(alive)):
            order = compaction_order(np.isin(np.arange(len(alive)), running))
            cache.keep(order, order)  # the last rows fill the gaps
            alive = [alive[r] for r in order]
            tokens = tokens.index_select(0, to_device(order, device))
            running = list(range(len(alive)))
    return [[t for t in out if t != eos_id] for out in outputs]
