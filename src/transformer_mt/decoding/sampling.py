"""Sampling: draw each next token from the model's distribution instead of searching for the
best one, as for back-translation (Edunov et al., 2018, "Understanding Back-Translation at
Scale": sampled or top-k sampled synthetic sources train better models than beam outputs).

At each step the logits are divided by the temperature, restricted to the ``topk`` most
probable tokens (0 = all), then to the nucleus: the most probable tokens whose probabilities
sum to ``topp`` (Holtzman et al., 2019, "The Curious Case of Neural Text Degeneration"; the
most probable token is always kept), and a token is drawn from what is left, renormalized.

Reproducible and batch-invariant: sample ``j`` of sentence ``i`` (its index in the whole
input) draws its uniforms from its own random stream, seeded by ``(seed, i, j)``, one uniform
per step, and picks its token by inverse transform sampling (the first token whose
cumulative probability exceeds the uniform). So a sentence's samples depend on the seed,
its index and the model only, not on the batch size or on the sentences beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from transformer_mt.decoding.beam import Hypothesis
from transformer_mt.decoding.search import (
    IncrementalDecoder,
    SearchOptions,
    apply_constraints,
    leave_batch,
    max_output_lengths,
    top_k,
)


def stream_uniforms(seed: int, index: int, sample: int, steps: int) -> np.ndarray:
    """The ``steps`` uniforms in [0, 1) of sample ``sample`` of sentence ``index``: the
    first ``steps`` numbers of the stream seeded by (seed, index, sample), so they do not
    depend on how many are drawn (NumPy's SeedSequence makes the streams independent)."""
    return np.random.default_rng([seed, index, sample]).random(steps)


def filter_probs(
    logits: torch.Tensor,  # (R, V) scores with forbidden tokens at -inf
    topk: int,
    topp: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution to draw from: probabilities (R, C) over C candidates, zero where
    filtered out, and the candidates' token ids (R, C), or None when the candidates are the
    whole vocabulary in order (no top-k and no top-p: no sort needed)."""
    scaled = logits / temperature if temperature != 1.0 else logits
    vocab = scaled.size(1)
    if topk == 0 and topp >= 1.0:
        return torch.softmax(scaled, dim=1), None
    if 0 < topk < vocab:
        values, index = top_k(scaled, topk)  # (R, k) sorted, most probable first
    else:  # top-p alone needs the whole vocabulary sorted
        values, index = scaled.sort(dim=1, descending=True)
    probs = torch.softmax(values, dim=1)  # renormalized over the top k
    if topp < 1.0:
        before = probs.cumsum(dim=1) - probs  # mass of the more probable candidates
        probs = probs.masked_fill(before >= topp, 0.0)  # the first always stays (0 < topp)
    return probs, index


def draw(probs: torch.Tensor, index: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse transform sampling: per row, the first candidate whose cumulative probability
    exceeds ``uniform · total`` (a candidate of probability 0 is never drawn) -> token ids (R,)."""
    cdf = probs.double().cumsum(dim=1)  # (R, C), in float64 so that no candidate is lost
    target = uniforms * cdf[:, -1]  # (R,) < the total mass
    j = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=cdf.size(1) - 1)
    return j if index is None else index.gather(1, j[:, None])[:, 0]


@torch.inference_mode()
def sample_search(
    model: IncrementalDecoder,
    src: torch.Tensor,  # (B, S) source ids, EOS-terminated, right-padded
    bos_id: int,
    eos_id: int,
    options: SearchOptions,
    streams: Sequence[int] | None = None,
) -> list[list[Hypothesis]]:
    """``options.nbest`` sampled translations of each sentence of a batch (see the module
    doc), sorted by log-probability, best first; duplicates are kept (they are independent
    samples).

    ``streams[b]`` is the index of sentence ``b`` in the whole input (default: its row), which
    seeds its random streams. Length limits and n-gram blocking are those of greedy and beam
    search (a sentence at its budget can only draw EOS). A hypothesis's ``score`` and
    ``log_prob`` are both its log-probability, EOS included, under the model itself (as
    fairseq reports): temperature 1, no top-k/top-p truncation, as beam search scores.
    Each (sentence, sample) is one decoder row, decoded as greedy search decodes its rows,
    finished rows leaving the batch.
    """
    n = options.nbest
    batch, device = src.size(0), src.device
    streams = list(range(batch)) if streams is None else list(streams)
    if len(streams) != batch:
        raise ValueError(f"{len(streams)} stream indices for a batch of {batch}")
    memory, memory_mask = model.encode(src)  # (B, S, d), (B, 1, 1, S)
    memory, memory_mask = memory.repeat_interleave(n, 0), memory_mask.repeat_interleave(n, 0)
    budget = max_output_lengths(
        src, model.pad_id, options.max_len_a, options.max_len_b, model.max_positions
    ).tolist()
    budget = [b for b in budget for _ in range(n)]  # one row per (sentence, sample)
    steps, limits = max(budget), np.array(budget)
    noise = np.zeros((batch * n, steps))
    for r, b in enumerate(budget):
        noise[r, :b] = stream_uniforms(options.seed, streams[r // n], r % n, b)
    uniforms = torch.from_numpy(noise).to(device)  # (R, T) float64
    cache = model.start_decoding(memory, memory_mask, 1, steps)
    alive = np.arange(batch * n)  # the (sentence, sample) of each decoder row
    outputs: list[list[int]] = [[] for _ in alive]
    log_probs = [0.0 for _ in alive]
    tokens = torch.full((len(alive),), bos_id, dtype=torch.long, device=device)
    special = (model.pad_id, bos_id, eos_id)
    for step in range(steps):
        logits = model.decode_step(tokens, cache)  # (R, V)
        log_z = torch.logsumexp(logits, dim=1)  # (R,) the model's own normalizer
        history = [outputs[s] for s in alive] if options.no_repeat_ngram else []
        at_limit = np.nonzero(step + 1 >= limits[alive])[0].tolist()
        apply_constraints(logits, history, at_limit, step, special, options)
        probs, index = filter_probs(logits, options.topk, options.topp, options.temperature)
        tokens = draw(probs, index, uniforms[:, step])
        log_p = logits.gather(1, tokens[:, None])[:, 0] - log_z  # (R,) log P(token | prefix)
        host = torch.stack([tokens.double(), log_p.double()]).cpu().numpy()  # one host copy
        chosen = host[0].astype(np.int64)
        for s, token, lp in zip(alive.tolist(), chosen.tolist(), host[1].tolist(), strict=True):
            outputs[s].append(token)
            log_probs[s] += lp
        finished = chosen == eos_id
        if finished.all():
            break
        if finished.any():  # finished rows leave the batch
            order, (tokens, uniforms) = leave_batch(cache, finished, tokens, uniforms)
            alive = alive[order]
    hyps = [
        Hypothesis([t for t in out if t != eos_id], lp, lp)
        for out, lp in zip(outputs, log_probs, strict=True)
    ]
    return [sorted(hyps[b * n : (b + 1) * n], key=lambda h: -h.log_prob) for b in range(batch)]
