"""The key/value cache of incremental decoding (inference).

The decoder produces one target position per step. Its self-attention needs the keys and
values of every earlier position: they are written once into a buffer preallocated for the
whole output budget, never concatenated. Its cross-attention needs the source's keys and
values: they are computed once per batch, one copy per sentence, shared by the sentence's
``group`` consecutive decoder rows (its beam hypotheses), so reordering hypotheses never
touches them; they change only when finished sentences leave the batch.

On CPU the self-attention buffer is reused from batch to batch (one per thread, lent to one
cache at a time): a fresh buffer of tens of megabytes is memory the kernel maps page by page
as decoding first writes it, which cost beam search about 8% of its time.

A step's attention reads at least ``MIN_KEYS`` keys once there are ``PAD_FROM`` or more
(:func:`padded_keys`): the source is padded to that length, and the self-attention reads that
many cached positions, those not decoded yet hidden by an additive -inf (and zero in the
buffer, so that hiding them is exact). On a CPU a softmax over rows shorter than 16 floats and
batched products of fewer than 400 multiply-adds take scalar code paths: attention over 4 to
15 keys took up to 3× as long as over 16 with the extra ones masked (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

MIN_KEYS = 16  # a step's attention reads at least this many keys (padded, masked) ...
PAD_FROM = 4  # ... once it has this many: over fewer, the padding costs more than it saves


def padded_keys(n: int) -> int:
    """How many keys a decoding step's attention reads when ``n`` are real."""
    return MIN_KEYS if PAD_FROM <= n < MIN_KEYS else n


def pad_source(
    memory: torch.Tensor,  # (N, S, d)
    memory_mask: torch.Tensor,  # (N, 1, 1, S) bool, True at source tokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder output and mask padded to ``padded_keys(S)`` positions, the new ones masked."""
    extra = padded_keys(memory.size(1)) - memory.size(1)
    if extra == 0:
        return memory, memory_mask
    return F.pad(memory, (0, 0, 0, extra)), F.pad(memory_mask, (0, extra), value=False)


class _Workspace(threading.local):
    """This thread's self-attention buffer, and the cache it is lent to (if still alive)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.borrower: weakref.ref[KVCache] | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype and device: a view of the
        buffer on CPU unless a live cache holds it, else a new one."""
        in_use = self.borrower is not None and self.borrower() is not None
        if like.device.type != "cpu" or in_use:
            return like.new_empty(shape)
        numel, buffer = math.prod(shape), self.buffer
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != like.dtype
            or buffer.is_inference() != torch.is_inference_mode_enabled()  # writable here
        ):
            buffer = self.buffer = like.new_empty(numel)
        return buffer[:numel].view(shape)

    def lend(self, cache: KVCache) -> None:
        """Mark the buffer as used by ``cache`` if its self-attention tensor is a view of it."""
        buffer = self.buffer
        if buffer is not None and cache.self_kv.data_ptr() == buffer.data_ptr():
            self.borrower = weakref.ref(cache)


_WORKSPACE = _Workspace()


def self_attention_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uninitialized storage for a cache's ``self_kv``; on CPU this thread's reusable buffer
    when no live cache holds it (``KVCache`` marks it held when built on it)."""
    return _WORKSPACE.take(shape, like)


def _reorder(x: torch.Tensor, dim: int, order: np.ndarray) -> None:
    """In place, position ``i`` of ``x`` along ``dim`` takes entry ``order[i]``; only the
    entries that change position are copied, their sources read before any is written."""
    dst = np.nonzero(order != np.arange(order.size))[0]
    if dst.size:
        src = torch.from_numpy(order[dst]).to(x.device, non_blocking=True)
        x.index_copy_(
            dim, torch.from_numpy(dst).to(x.device, non_blocking=True), x.index_select(dim, src)
        )


@dataclass
class KVCache:
    """Keys and values of one batch being decoded: R decoder rows for N sentences, the rows
    of a sentence consecutive (its beam hypotheses), as many for every sentence. Only
    ``keep`` changes ``rows`` and ``sentences`` (it remakes the per-layer views).

    The buffer ``self_kv`` comes uninitialized; its first ``MIN_KEYS`` positions are zeroed here
    (a padded step reads them before they are decoded), and it holds at least that many."""

    # (L, 2, R_0, H, T_max, d_k): decoded positions, T_max = max(steps, MIN_KEYS); rows [:R] in use
    self_kv: torch.Tensor
    # (L, 2, N_0, H, S, d_k): the source's, S = padded_keys(source length); sentences [:N] in use
    source_kv: torch.Tensor
    source_bias: torch.Tensor  # (N_0, 1, 1, S): 0 at source tokens, -inf at padding
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]]  # per layer: Q, K, V weights stacked
    project: Callable[[torch.Tensor], torch.Tensor]  # decoder states (R, d) -> logits (R, V)
    steps: int  # positions that may be decoded (≤ T_max)
    rows: int = 0  # decoder rows in use
    sentences: int = 0  # source sentences in use
    length: int = 0  # positions decoded so far
    # each layer's views of the rows and sentences in use, made again when those change
    _self_views: list[torch.Tensor] = field(init=False, repr=False)
    _source_views: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)
    _future: torch.Tensor = field(init=False, repr=False)  # (MIN_KEYS, MIN_KEYS) row i: -inf past i

    def __post_init__(self) -> None:
        if self.self_kv.size(4) < MIN_KEYS:
            raise ValueError(f"the self-attention buffer needs at least {MIN_KEYS} positions")
        _WORKSPACE.lend(self)
        self.self_kv[:, :, :, :, :MIN_KEYS].zero_()
        self._future = self.self_kv.new_full((MIN_KEYS, MIN_KEYS), -torch.inf).triu_(1)
        self._make_views()

    def _make_views(self) -> None:
        layers, bias = range(self.self_kv.size(0)), self.source_bias[: self.sentences]
        self._self_views = [self.self_kv[i, :, : self.rows] for i in layers]
        self._source_views = [(self.source_kv[i, :, : self.sentences], bias) for i in layers]

    def layer_self(self, layer: int) -> torch.Tensor:
        """(2, R, H, T_max, d_k): layer ``layer``'s self-attention keys and values."""
        return self._self_views[layer]

    def self_keys(self) -> tuple[int, torch.Tensor | None]:
        """How many cached positions this step's self-attention reads (``padded_keys`` of the
        positions decoded, this one included), and the additive bias (that many,) hiding
        those beyond this one; None when there are none."""
        n = self.length + 1
        span = padded_keys(n)
        return span, None if span == n else self._future[n - 1]

    def layer_source(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s cross-attention keys and values (2, N, H, S, d_k) and the source
        mask's additive bias (N, 1, 1, S)."""
        return self._source_views[layer]

    def keep(self, rows: np.ndarray, sentences: np.ndarray) -> None:
        """Row ``i`` takes row ``rows[i]``'s decoded prefix (beam reordering; several rows
        may take the same one) and sentence ``i`` the source of sentence ``sentences[i]``
        (finished sentences leave the batch). At most ``R_0`` rows. Only the entries that
        change position are copied, so keeping survivors in place and moving the last
        sentences into the gaps (``decoding.search.compaction_order``) copies a row per
        hypothesis that moved, not the cache.
        """
        if self.length:
            past = self.self_kv[:, :, :, :, : self.length]  # (L, 2, R_0, H, t, d_k)
            _reorder(past, 2, np.asarray(rows, dtype=np.int64))
        self.rows = len(rows)
        sentences = np.asarray(sentences, dtype=np.int64)
        _reorder(self.source_kv, 2, sentences)
        _reorder(self.source_bias, 0, sentences)
        self.sentences = len(sentences)
        self._make_views()
