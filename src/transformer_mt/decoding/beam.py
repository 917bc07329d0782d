"""Batched beam search with a GNMT length penalty.

Each sentence keeps ``beam_size`` live hypotheses. At every step the best ``2·beam_size``
extensions are ranked; those ending in EOS among the top ``beam_size`` are finished
(scored log P / lp(|Y|) with lp = ((5 + |Y|) / 6)^α), the best ``beam_size`` others live on.
A sentence is done when it has ``beam_size`` finished hypotheses; done sentences leave
the batch so the remaining ones decode faster.

The device computes the model, the log-probabilities and the top 2·beam_size extensions of
each sentence; they come to the host in one copy per step, where the bookkeeping (finished
hypotheses, survivors, their token histories) is done on small arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from transformer_mt.decoding.search import (
    BEAM,
    IncrementalDecoder,
    SearchOptions,
    apply_constraints,
    compaction_order,
    max_output_lengths,
    to_device,
    top_k,
)


@dataclass
class Hypothesis:
    """A finished translation: ids without BOS/EOS, its length-normalized and raw scores."""

    tokens: list[int]
    score: float
    log_prob: float


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6)^α; α = 0 ranks by raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def place_survivors(parents: np.ndarray) -> np.ndarray:
    """Which slot (row of its sentence) each survivor takes: (n, K) parent beams, in rank
    order -> (n, K) slots. The first survivor of each parent stays in its parent's slot, so
    its cached prefix is not copied; the others take the slots no survivor descends from."""
    n, k = parents.shape
    flat = (parents + k * np.arange(n)[:, None]).ravel()
    _, first = np.unique(flat, return_index=True)  # the first survivor of each parent
    stays = np.zeros(n * k, dtype=bool)
    stays[first] = True
    slots = np.where(stays, parents.ravel(), -1).reshape(n, k)
    free = np.ones((n, k), dtype=bool)
    free[np.nonzero(stays.reshape(n, k))[0], parents.ravel()[stays]] = False
    movers, free_slots = np.nonzero(slots < 0), np.nonzero(free)  # both in row order
    slots[movers] = free_slots[1]  # as many movers as free slots in each row
    return slots


@torch.inference_mode()
def beam_search(
    model: IncrementalDecoder,
    src: torch.Tensor,  # (B, S)
    bos_id: int,
    eos_id: int,
    options: SearchOptions = BEAM,
) -> list[list[Hypothesis]]:
    """Beam search over a batch; returns the ``options.nbest`` best hypotheses per sentence."""
    k, alpha = options.beam_size, options.alpha
    batch, device = src.size(0), src.device
    memory, memory_mask = model.encode(src)
    budget = np.array(
        max_output_lengths(
            src, model.pad_id, options.max_len_a, options.max_len_b, model.max_positions
        ).tolist()
    )
    cache = model.start_decoding(memory, memory_mask, k, int(budget.max()))
    # The K hypotheses of a sentence start identical (BOS): the first step decodes one row
    # per sentence, and its survivors spread to K rows.
    cache.keep(np.arange(batch) * k, np.arange(batch))
    special = (model.pad_id, bos_id, eos_id)

    alive = np.arange(batch)  # the sentence of each live row block
    width = 1  # rows per sentence this step: 1, then K
    scores = torch.zeros(batch, width, device=device)  # cumulative log-probs of live beams
    history = np.zeros((batch, 0), dtype=np.int64)  # tokens of each hypothesis
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]

    for step in range(int(budget.max())):
        n = alive.size
        logits = model.decode_step(tokens, cache)  # (n·width, V)
        lprobs = torch.log_softmax(logits, dim=-1, out=logits)  # in place, row by row
        vocab = lprobs.size(-1)
        limit = step + 1 >= budget[alive]  # (n,) out of budget: finished after this step
        at_limit = np.nonzero(np.repeat(limit, width))[0].tolist()
        past = history.tolist() if options.no_repeat_ngram else []  # for n-gram blocking only
        apply_constraints(lprobs, past, at_limit, step, special, options)
        candidates = lprobs.add_(scores.view(-1, 1)).view(n, width * vocab)  # scores + log-probs
        if candidates.size(1) < 2 * k:  # a vocabulary smaller than 2K: pad with impossibles
            candidates = F.pad(candidates, (0, 2 * k - candidates.size(1)), value=-torch.inf)
        top_scores, top_index = top_k(candidates, 2 * k)  # (n, 2K)
        # The step's one host copy (float64 holds every index exactly).
        top = torch.stack([top_scores.double(), top_index.double()]).cpu().numpy()
        top_scores_np, top_index_np = top[0].astype(np.float32), top[1].astype(np.int64)
        top_beam, top_token = np.minimum(top_index_np // vocab, width - 1), top_index_np % vocab
        is_eos = top_token == eos_id

        # Finish EOS candidates ranked within the top K.
        done = limit.copy()
        eos_rows, eos_ranks = np.nonzero(is_eos[:, :k] & (top_scores_np[:, :k] > -np.inf))
        for row, rank in zip(eos_rows.tolist(), eos_ranks.tolist(), strict=True):
            hyps = finished[alive[row]]
            if len(hyps) >= k:
                continue
            prefix = history[row * width + top_beam[row, rank]].tolist()
            log_prob = float(top_scores_np[row, rank])
            hyps.append(
                Hypothesis(prefix, log_prob / length_penalty(len(prefix) + 1, alpha), log_prob)
            )
            done[row] |= len(hyps) >= k

        # The best K non-EOS candidates live on (at most K of the 2K are EOS), each in a
        # row of its sentence chosen so that as few cached prefixes as possible move.
        keep = np.argsort(is_eos, axis=1, kind="stable")[:, :k]  # (n, K) in rank order
        parents = np.take_along_axis(top_beam, keep, 1)
        slots = place_survivors(parents)
        order = np.argsort(slots, axis=1)  # the survivor in each slot
        new_scores = np.take_along_axis(np.take_along_axis(top_scores_np, keep, 1), order, 1)
        next_tokens = np.take_along_axis(np.take_along_axis(top_token, keep, 1), order, 1)
        parent_rows = np.take_along_axis(parents, order, 1) + width * np.arange(n)[:, None]
        history = np.concatenate([history[parent_rows.ravel()], next_tokens.reshape(-1, 1)], 1)
        if done.all():
            break
        # Row i·K + j takes its parent's cached prefix; finished sentences leave the batch,
        # the last ones filling their places. One cache update, copying only what moves.
        stay = compaction_order(~done) if done.any() else np.arange(n)
        cache.keep(parent_rows[stay].ravel(), stay)
        alive, new_scores, next_tokens = alive[stay], new_scores[stay], next_tokens[stay]
        history = history[(stay[:, None] * k + np.arange(k)).ravel()]
        width = k
        scores = to_device(new_scores, device)
        tokens = to_device(next_tokens.reshape(-1), device)

    return [sorted(hyps, key=lambda h: -h.score)[: options.nbest] for hyps in finished]
