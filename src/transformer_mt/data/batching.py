"""Token-budget batches of length-bucketed examples, and their padded tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from transformer_mt.data.dataset import EncodedSplit


@dataclass
class Batch:
    """A padded batch. ``tgt_in`` starts with BOS, ``tgt_out`` ends with EOS.

    ``tgt_positions`` lists where the real target tokens are, as flat indices into the
    B·T positions of ``tgt_out``: the model projects only those onto the vocabulary, so no
    output-layer or loss work is spent on padding. Found here, on the host, so that the
    training step needs no device sync to find them.
    """

    src: torch.Tensor  # (B, S)
    tgt_in: torch.Tensor  # (B, T)
    tgt_out: torch.Tensor  # (B, T)
    tgt_positions: torch.Tensor  # (N,) flat indices of the non-pad entries of tgt_out

    @property
    def n_tgt_tokens(self) -> int:
        """N: real (non-pad) target tokens, EOS included (known on the host, no device sync)."""
        return self.tgt_positions.numel()

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (an asynchronous copy on CUDA)."""
        nb = device.type == "cuda"
        return Batch(
            self.src.to(device, non_blocking=nb),
            self.tgt_in.to(device, non_blocking=nb),
            self.tgt_out.to(device, non_blocking=nb),
            self.tgt_positions.to(device, non_blocking=nb),
        )

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (for asynchronous copies to a GPU)."""
        return Batch(
            self.src.pin_memory(),
            self.tgt_in.pin_memory(),
            self.tgt_out.pin_memory(),
            self.tgt_positions.pin_memory(),
        )

    def real_targets(self) -> torch.Tensor:
        """(N,) the target ids at ``tgt_positions``, in the same order."""
        return self.tgt_out.reshape(-1).index_select(0, self.tgt_positions)


def token_batches(
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    max_tokens: int,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Group example indices into batches of at most ``max_tokens`` padded tokens.

    Examples are sorted by length (ties broken randomly when ``rng`` is given) so each
    batch holds similar lengths and little padding; the cost of a batch is
    ``n_examples · max(longest source, longest target)`` counting BOS/EOS, and a batch is
    closed before the example that would take it over the budget (an example over the budget
    on its own is a batch of one). With ``rng`` the batch order is shuffled. Vectorised: the
    Python loop runs once per batch, not per example.
    """
    n = len(src_lengths)
    src_len = np.asarray(src_lengths, dtype=np.int64) + 1  # + EOS
    tgt_len = np.asarray(tgt_lengths, dtype=np.int64) + 1  # + BOS / EOS
    tie = rng.random(n) if rng is not None else np.arange(n)
    order = np.lexsort((tie, src_len, tgt_len))  # sort by target, then source length
    cost = np.maximum(src_len, tgt_len)[order]  # (n,) each example's padded length, sorted
    batches: list[np.ndarray] = []
    start, window = 0, 64
    while start < n:
        while True:  # a window of examples long enough to hold the next batch
            end = min(start + window, n)
            padded = np.maximum.accumulate(cost[start:end]) * np.arange(1, end - start + 1)
            over = np.flatnonzero(padded > max_tokens)
            if len(over) or end == n:
                break
            window *= 2
        size = max(int(over[0]) if len(over) else end - start, 1)
        batches.append(order[start : start + size])
        start += size
        window = max(64, 2 * size)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-pad sequences of ids into a (B, T) long tensor."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def _gather(
    tokens: np.ndarray, offsets: np.ndarray, indices: np.ndarray, max_len: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sentences ``indices`` as a (B, T) int64 matrix (zeros past each end), their
    lengths (B,) and the (B, T) mask of real tokens; each cut to ``max_len``."""
    starts = offsets[indices]
    lengths = offsets[indices + 1] - starts
    if max_len is not None:
        lengths = np.minimum(lengths, max_len)
    cols = np.arange(int(lengths.max()) if len(lengths) else 0)
    mask = cols[None, :] < lengths[:, None]
    values = np.asarray(tokens)[np.where(mask, starts[:, None] + cols[None, :], 0)]
    return np.where(mask, values, 0).astype(np.int64), lengths, mask


def collate(
    split: EncodedSplit,
    indices: np.ndarray,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    max_len: int | None = None,
) -> Batch:
    """Build the padded tensors of the pairs ``indices`` of ``split`` (vectorised: no loop
    over sentences).

    ``max_len`` truncates each side to that many subwords (before BOS/EOS are added).
    """
    idx = np.asarray(indices, dtype=np.int64)
    rows = np.arange(len(idx))
    s, s_len, s_mask = _gather(split.src_tokens, split.src_offsets, idx, max_len)
    t, t_len, t_mask = _gather(split.tgt_tokens, split.tgt_offsets, idx, max_len)
    src = np.full((len(idx), s.shape[1] + 1), pad_id, dtype=np.int64)  # tokens, EOS
    src[:, :-1][s_mask] = s[s_mask]
    src[rows, s_len] = eos_id
    tgt_in = np.full((len(idx), t.shape[1] + 1), pad_id, dtype=np.int64)  # BOS, tokens
    tgt_in[:, 0] = bos_id
    tgt_in[:, 1:][t_mask] = t[t_mask]
    tgt_out = np.full_like(tgt_in, pad_id)  # tokens, EOS
    tgt_out[:, :-1][t_mask] = t[t_mask]
    tgt_out[rows, t_len] = eos_id
    positions = np.flatnonzero(tgt_out.reshape(-1) != pad_id)  # (N,)
    return Batch(
        torch.from_numpy(src),
        torch.from_numpy(tgt_in),
        torch.from_numpy(tgt_out),
        torch.from_numpy(positions),
    )


def target_tokens(split: EncodedSplit, indices: np.ndarray) -> int:
    """The real target tokens (EOS included) that ``collate`` of ``indices`` would hold: a
    host-side count, so that every rank knows an update's total without a collective."""
    return int((split.tgt_lengths[np.asarray(indices, dtype=np.int64)] + 1).sum())


def iterate_batches(
    split: EncodedSplit,
    max_tokens: int,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    rng: np.random.Generator | None = None,
    max_len: int | None = None,
) -> Iterator[Batch]:
    """All batches of ``split`` for one epoch (shuffled when ``rng`` is given).

    ``max_len`` truncates longer sentences (for evaluation splits, which are not filtered).
    """
    src_lengths, tgt_lengths = split.src_lengths, split.tgt_lengths
    if max_len is not None:
        src_lengths, tgt_lengths = src_lengths.clip(max=max_len), tgt_lengths.clip(max=max_len)
    for indices in token_batches(src_lengths, tgt_lengths, max_tokens, rng):
        yield collate(split, indices, pad_id, bos_id, eos_id, max_len)
