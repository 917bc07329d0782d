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
    ``n_examples · max(longest source, longest target)`` counting BOS/EOS. With ``rng``
    the batch order is shuffled.
    """
    n = len(src_lengths)
    src_len = np.asarray(src_lengths, dtype=np.int64) + 1  # + EOS
    tgt_len = np.asarray(tgt_lengths, dtype=np.int64) + 1  # + BOS / EOS
    tie = rng.random(n) if rng is not None else np.arange(n)
    order = np.lexsort((tie, src_len, tgt_len))  # sort by target, then source length
    batches: list[np.ndarray] = []
    start, longest = 0, 0
    for pos in range(n):
        i = order[pos]
        longest_with_i = max(longest, src_len[i], tgt_len[i])
        if pos > start and longest_with_i * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, longest_with_i = pos, max(src_len[i], tgt_len[i])
        longest = longest_with_i
    if start < n:
        batches.append(order[start:n])
    if rng is not None:
        rng.shuffle(batches)
    return batches


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-pad sequences of ids into a (B, T) long tensor."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def collate(
    split: EncodedSplit,
    indices: np.ndarray,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    max_len: int | None = None,
) -> Batch:
    """Build the padded tensors of the pairs ``indices`` of ``split``.

    ``max_len`` truncates each side to that many subwords (before BOS/EOS are added).
    """
    srcs, tgt_ins, tgt_outs = [], [], []
    for i in indices:
        s, t = split.pair(int(i))
        s, t = s[:max_len].tolist(), t[:max_len].tolist()
        srcs.append([*s, eos_id])
        tgt_ins.append([bos_id, *t])
        tgt_outs.append([*t, eos_id])
    tgt_out = pad(tgt_outs, pad_id)
    positions = (tgt_out.reshape(-1) != pad_id).nonzero().squeeze(1)  # (N,)
    return Batch(pad(srcs, pad_id), pad(tgt_ins, pad_id), tgt_out, positions)


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
