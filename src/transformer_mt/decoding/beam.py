"""Batched beam search with a GNMT length penalty.

Each sentence keeps ``beam_size`` live hypotheses. At every step the best ``2·beam_size``
extensions are ranked; those ending in EOS among the top ``beam_size`` are finished
(scored log P / lp(|Y|) with lp = ((5 + |Y|) / 6)^α), the best ``beam_size`` others live on.
A sentence is done when it has ``beam_size`` finished hypotheses; done sentences leave
the batch so the remaining ones decode faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transformer_mt.decoding.search import (
    BEAM,
    IncrementalDecoder,
    SearchOptions,
    apply_constraints,
    max_output_lengths,
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
    memory = memory.repeat_interleave(k, dim=0)  # (B·K, S, d)
    memory_mask = memory_mask.repeat_interleave(k, dim=0)
    max_lens = max_output_lengths(
        src, model.pad_id, options.max_len_a, options.max_len_b, model.max_positions
    )
    cache = model.new_cache()
    special = (model.pad_id, bos_id, eos_id)

    alive = torch.arange(batch, device=device)  # original sentence index of each live row
    scores = torch.zeros(batch, k, device=device)  # cumulative log-probs of live beams
    scores[:, 1:] = -torch.inf  # all beams start identical: keep one
    history = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    tokens = torch.full((batch * k,), bos_id, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]

    for step in range(int(max_lens.max())):
        n = alive.numel()
        lprobs = model.decode_step(tokens, memory, memory_mask, cache, step)  # (n·K, V)
        vocab = lprobs.size(-1)
        at_limit = (step + 1 >= max_lens[alive]).repeat_interleave(k)  # (n·K,)
        apply_constraints(lprobs, history, at_limit, step, special, options)
        candidates = (scores.view(-1, 1) + lprobs).view(n, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=1)  # (n, 2K)
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == eos_id

        # Finish EOS candidates ranked within the top K.
        done = (step + 1 >= max_lens[alive]).cpu()  # out of budget: finished after this step
        eos_rows, eos_ranks = torch.nonzero(
            is_eos[:, :k] & (top_scores[:, :k] > -torch.inf), as_tuple=True
        )
        if eos_rows.numel():
            for row, rank in zip(eos_rows.tolist(), eos_ranks.tolist(), strict=True):
                sentence = int(alive[row])
                if len(finished[sentence]) >= k:
                    continue
                prefix = history[row * k + int(top_beam[row, rank])].tolist()
                log_prob = float(top_scores[row, rank])
                finished[sentence].append(
                    Hypothesis(prefix, log_prob / length_penalty(len(prefix) + 1, alpha), log_prob)
                )
            for row in set(eos_rows.tolist()):
                done[row] |= len(finished[int(alive[row])]) >= k

        # The best K non-EOS candidates live on (at most K of the 2K are EOS).
        rank_keys = is_eos.long() * (2 * k) + torch.arange(2 * k, device=device)
        keep = rank_keys.argsort(dim=1)[:, :k]  # (n, K)
        scores = top_scores.gather(1, keep)
        beams = top_beam.gather(1, keep)
        next_tokens = top_token.gather(1, keep)
        rows = (torch.arange(n, device=device).unsqueeze(1) * k + beams).view(-1)  # (n·K,)

        stay = ~done.to(device)
        if not bool(stay.any()):
            break
        if not bool(stay.all()):  # drop finished sentences from the batch
            scores, next_tokens = scores[stay], next_tokens[stay]
            rows = rows.view(n, k)[stay].view(-1)
            alive = alive[stay]
            memory = memory.view(n, k, *memory.shape[1:])[stay].flatten(0, 1)
            memory_mask = memory_mask.view(n, k, *memory_mask.shape[1:])[stay].flatten(0, 1)
        model.reorder_cache(cache, rows)
        history = torch.cat([history[rows], next_tokens.view(-1, 1)], dim=1)
        tokens = next_tokens.view(-1)

    return [sorted(hyps, key=lambda h: -h.score)[: options.nbest] for hyps in finished]
