"""Decoding in several worker processes: data parallelism for CPU inference.

A search step is many small operations, and on a CPU a few threads share them out poorly: the
Python between them runs on one core, and an operator on a handful of rows gains little from
a second thread. Several processes of fewer threads each, every one decoding whole batches,
keep all cores busy instead (what CTranslate2 calls ``inter_threads`` and Marian its CPU
workers):

>>> from transformer_mt.decoding import Translator
>>> from transformer_mt.decoding.workers import PooledTranslator
>>> with PooledTranslator(Translator.from_checkpoint("final.pt"), workers=2) as t:
...     t.translate(sentences, beam_size=5)   # 2 processes of 1 thread each on 2 cores

The batches are those one process would make (sorted by length), handed out in order to
whichever worker is free, and their results put back in input order: the translations are
those of one process (a batch's search does not depend on the other batches), bit for bit
when each worker has that process's number of threads (tested). With fewer threads a matrix
product may sum in another order and round differently in the last bit; the 1,000 test
sentences of the default en→de model came out the same. The workers are started with
``spawn`` (a fork of a process whose OpenMP threads have run can hang) and share the parent's
weights through shared memory; starting them takes a few seconds (each imports torch), so
they pay off on inputs of thousands of sentences, or over many calls of one PooledTranslator
(they live until :meth:`PooledTranslator.close`, and end if this process dies).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Any, NoReturn

import torch

from transformer_mt.decoding.beam import Hypothesis
from transformer_mt.decoding.translator import Batch, Translator
from transformer_mt.errors import UserError

# The translator of a worker process, set once by _start_worker.
_WORKER: Translator | None = None


def _start_worker(settings: dict[str, Any], threads: int, parent: int) -> None:
    """A worker process's initializer: its translator, on ``threads`` intra-op threads, and
    a watch that ends the process if its parent (process id ``parent``) dies."""
    global _WORKER
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    _WORKER = Translator(**settings)
    gc.collect()
    gc.freeze()  # the loaded objects are not garbage: collections need not walk them


def _exit_with(parent: int) -> None:
    """End this process once ``parent`` is no longer its parent (it died: a killed
    parent's pool cannot stop its workers, which would wait for work forever)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _search(batch: Batch) -> list[list[Hypothesis]]:
    """One batch's hypotheses, in a worker process."""
    assert _WORKER is not None, "not a decoding worker process"
    return _WORKER.search_batch(batch)


def _worker_pid(_: int) -> int:
    """This worker's process id, after a pause that lets the other workers take a call."""
    time.sleep(0.05)
    return os.getpid()


def threads_per_worker(workers: int) -> int:
    """Intra-op threads for each of ``workers`` processes: this process's shared out, at
    least one each."""
    return max(1, torch.get_num_threads() // workers)


class PooledTranslator(Translator):
    """A Translator whose batches are decoded by ``workers`` processes of ``threads``
    intra-op threads each (default: this process's threads shared out, at least one each).
    With one worker it decodes in this process, as a plain Translator. CPU only.

    The processes start at the first translation (or :meth:`start`, or the start of a
    ``with`` block) and stop at :meth:`close` or the end of the block. If one dies, the
    translation that needed it raises RuntimeError and the pool is started anew at the next
    call."""

    def __init__(self, translator: Translator, workers: int, threads: int | None = None) -> None:
        if workers < 1:
            raise UserError(f"workers must be ≥ 1, got {workers}")
        if threads is not None and threads < 1:
            raise UserError(f"threads per worker must be ≥ 1, got {threads}")
        if workers > 1 and translator.device.type != "cpu":
            raise UserError(
                f"decoding workers are for CPUs (the device is {translator.device}): on a GPU "
                "one process keeps it busy; decode with one worker and a larger --batch-size"
            )
        super().__init__(**translator.settings())
        self.workers = workers
        self.threads = threads or threads_per_worker(workers)
        self._pool: ProcessPoolExecutor | None = None
        self._pids: list[int] = []

    def start(self) -> None:
        """Start the worker processes, and return once each has loaded the model (else the
        first translation starts them). Nothing to do when they run, or with one worker."""
        if self._pool is not None or self.workers == 1:
            return
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.settings(), self.threads, os.getpid()),
        )
        # the pool starts a process per call while none is idle: calls that pause until
        # every worker has taken one (a call returns once its worker is initialized)
        pids: set[int] = set()
        try:
            while len(pids) < self.workers:
                pids.update(self._pool.map(_worker_pid, range(4 * self.workers)))
        except BrokenProcessPool as e:
            self._broken(e)
        self._pids = sorted(pids)

    def pids(self) -> list[int]:
        """The worker processes' ids (starting them if need be; this process's with one)."""
        if self.workers == 1:
            return [os.getpid()]
        self.start()
        return self._pids

    def search_batches(self, batches: list[Batch]) -> Iterator[list[list[Hypothesis]]]:
        """Each batch's hypotheses in order, the batches shared out between the workers."""
        if self.workers == 1:
            yield from super().search_batches(batches)
            return
        self.start()
        assert self._pool is not None
        try:
            yield from self._pool.map(_search, batches)
        except BrokenProcessPool as e:
            self._broken(e)

    def _broken(self, error: BrokenProcessPool) -> NoReturn:
        """A worker died: drop the pool (the next call starts another) and say so."""
        assert self._pool is not None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._pids = None, []
        raise RuntimeError(
            f"a decoding worker process died ({error}); out of memory, or killed? The "
            "translations of this call are lost; the next call starts new workers"
        ) from error

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pids = None, []

    def __enter__(self) -> PooledTranslator:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
