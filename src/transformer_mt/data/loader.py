"""Batches built ahead of the training step, in a background thread.

While the model runs one update, the next updates' batches are collated (and, for a CUDA
device, copied into pinned memory so that their transfer is asynchronous), so a fast step
does not wait for data. The time the loop still waits is counted (``wait_seconds``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from transformer_mt.data.batching import Batch

T = TypeVar("T")
U = TypeVar("U")


class Prefetcher(Generic[T, U]):
    """``make(item)`` for each item, in order, computed ``depth`` items ahead in one
    background thread. Use as a context manager (the thread stops at its end)."""

    def __init__(self, make: Callable[[T], U], items: Iterable[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {depth}")
        self.make, self.items, self.depth = make, iter(items), depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.pending: deque[Future[U]] = deque()
        self.wait_seconds = 0.0  # time __next__ spent waiting for the thread

    def _submit(self) -> bool:
        """Start building the next item, if there is one."""
        for item in self.items:
            self.pending.append(self.pool.submit(self.make, item))
            return True
        return False

    def __iter__(self) -> Iterator[U]:
        return self

    def __next__(self) -> U:
        while len(self.pending) < self.depth and self._submit():
            pass
        if not self.pending:
            raise StopIteration
        start = time.perf_counter()
        result = self.pending.popleft().result()  # re-raises the thread's exception
        self.wait_seconds += time.perf_counter() - start
        self._submit()  # keep ``depth`` items in the making while the caller works
        return result

    def close(self) -> None:
        """Drop what was built ahead and stop the thread."""
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher[T, U]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pinned(batches: list[tuple[Batch, float]]) -> list[tuple[Batch, float]]:
    """The micro-batches of an update with their tensors in pinned (page-locked) memory."""
    return [(b.pin_memory(), w) for b, w in batches]
