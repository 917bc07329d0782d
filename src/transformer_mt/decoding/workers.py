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

The batches are those one process would make (sorted by length), handed out the largest first
to whichever worker is free (so that the workers end together), and their results put back in
input order: the translations are those of one process (a batch's search does not depend on the
other batches), bit for bit when each worker has that process's number of threads (tested).
With fewer threads a matrix product may sum in another order and round differently in the last
bit; the 1,000 test sentences of the default en→de model came out the same. Threads that do
not divide by the workers are shared out unevenly (:func:`thread_shares`), and a batch may then
be decoded with either count from one run to the next. The workers are
started with ``spawn`` (a fork of a process whose OpenMP threads have run can hang) and share
the parent's weights through shared memory; starting them takes a few seconds (each imports
torch), so they pay off on inputs of thousands of sentences, or over many calls of one
PooledTranslator (they live until :meth:`PooledTranslator.close`, the PooledTranslator's
collection or this process's exit, and end if this process is killed). A bf16 or fp16
translator's workers make their own half-precision copies of the weights. A script that starts
workers needs the ``if __name__ == "__main__":`` guard: each worker imports the main module.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.reduction import ForkingPickler
from multiprocessing.util import Finalize

import torch

from transformer_mt.decoding.beam import Hypothesis
from transformer_mt.decoding.translator import Batch, Translator, freeze_loaded
from transformer_mt.errors import UserError

# The translator of a worker process, set once by _start_worker.
_WORKER: Translator | None = None


def _start_worker(settings: multiprocessing.Queue, parent: int) -> None:
    """A worker process's initializer: its translator and its number of intra-op threads
    (taken from the queue ``settings``: the Translator settings pickled, and the count), and a
    watch that ends the process if its parent (process id ``parent``) dies."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    pickled, threads = settings.get()
    torch.set_num_threads(threads)
    _WORKER = Translator(**ForkingPickler.loads(pickled))
    freeze_loaded()


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


def _worker_id(_: int) -> tuple[int, int]:
    """This worker's process id and intra-op threads, after a pause that lets the other
    workers take a call."""
    time.sleep(0.05)
    return os.getpid(), torch.get_num_threads()


def padded_tokens(batch: Batch) -> int:
    """The size of a batch's source tensor: sentences × the longest source."""
    return len(batch.sources) * max((len(s) for s in batch.sources), default=0)


def threads_per_worker(workers: int) -> int:
    """Intra-op threads for each of ``workers`` processes that must all have the same number
    (CTranslate2's ``inter_threads``): this process's shared out, rounded down, at least one."""
    return max(1, torch.get_num_threads() // workers)


def thread_shares(workers: int) -> list[int]:
    """Intra-op threads for each of ``workers`` processes: this process's shared out, the
    remainder one each to the first (3 threads, 2 workers: ``[2, 1]``), at least one each."""
    base, extra = divmod(torch.get_num_threads(), workers)
    return [max(1, base + (i < extra)) for i in range(workers)]


class PooledTranslator(Translator):
    """A Translator whose batches are decoded by ``workers`` processes of ``threads``
    intra-op threads each (default: this process's threads shared out, :func:`thread_shares`).
    With one worker it decodes in this process, as a plain Translator. CPU only.

    The processes start at the first translation (or :meth:`start`, or the start of a
    ``with`` block) and stop at :meth:`close` or the end of the block; a translation after
    :meth:`close` starts them again. If one dies, the translation that needed it raises
    RuntimeError and the next call starts new ones. A script that makes a PooledTranslator
    needs the ``if __name__ == "__main__":`` guard (the workers are spawned: each imports the
    main module)."""

    def __init__(self, translator: Translator, workers: int, threads: int | None = None) -> None:
        if workers < 1:
            raise UserError(f"--workers must be ≥ 1, got {workers}")
        if threads is not None and threads < 1:
            raise UserError(f"threads per worker must be ≥ 1, got {threads}")
        if workers > 1 and translator.device.type != "cpu":
            raise UserError(
                f"--workers {workers}: decoding workers are for CPUs, but the device is "
                f"{translator.device} (--device auto chooses CUDA where there is one); on a GPU "
                "one process keeps it busy: use --workers 1 (and a larger --batch-size) or "
                "--device cpu"
            )
        self._init_like(translator)
        self.workers = workers
        # each worker's intra-op threads
        self.threads = [threads] * workers if threads else thread_shares(workers)
        self._pool: ProcessPoolExecutor | None = None
        self._stop: Finalize | None = None  # stops the pool, at close() or at exit
        self._threads_of: dict[int, int] = {}  # each worker's process id: its threads
        self._lock = threading.Lock()  # one pool, even if two threads make the first call

    def start(self) -> None:
        """Start the worker processes, and return once each has loaded the model (else the
        first translation starts them). Nothing to do when they run, or with one worker."""
        with self._lock:
            if self._pool is None and self.workers > 1:
                self._start()

    def _start(self) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a spawned worker importing a main module that starts workers: stop here (its
            # own pool would keep it from exiting, and its parent would wait for it forever)
            raise RuntimeError(
                "decoding workers started while a worker process imports the main module: "
                'the script needs the `if __name__ == "__main__":` guard'
            )
        context = multiprocessing.get_context("spawn")
        # The settings (the model, its tokenizer) go through a queue, written by a thread of
        # its own: a process's start arguments are written by the thread that starts it,
        # which would wait forever on a worker that died before reading them all. They are
        # pickled here, once per worker, so that a failure is raised here: the weights move
        # to shared memory, and the workers map them.
        settings: multiprocessing.Queue = context.Queue()
        settings.cancel_join_thread()  # at exit, do not wait to write to workers that died
        try:
            for threads in self.threads:
                settings.put((bytes(ForkingPickler.dumps(self.settings())), threads))
        except RuntimeError as e:  # the weights could not be put in shared memory
            settings.close()
            raise UserError(
                f"cannot share the model with decoding worker processes: {e}. Is /dev/shm too "
                "small (a container's default is 64 MB)? Use --workers 1, or more shared "
                "memory (docker run --shm-size)"
            ) from e
        pool = ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_start_worker,
            initargs=(settings, os.getpid()),
        )
        # The pool starts a process per call while none is idle: calls that pause until
        # every worker has taken one (a call returns once its worker is initialized).
        threads_of: dict[int, int] = {}
        try:
            while len(threads_of) < self.workers:
                threads_of.update(pool.map(_worker_id, range(4 * self.workers)))
        except BrokenProcessPool as e:
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                f"the decoding worker processes failed to start ({e}; their error is printed "
                'above). A script that starts them needs the `if __name__ == "__main__":` '
                "guard: each worker imports the main module"
            ) from e
        self._pool, self._threads_of = pool, threads_of
        # Stop the workers when this translator is collected, or at exit before the
        # process waits for its children: a child process (a decoding worker of its own
        # parent's pool, say) does not run the pool's own exit hook, and would wait forever.
        self._stop = Finalize(self, pool.shutdown, kwargs={"cancel_futures": True}, exitpriority=10)

    def pids(self) -> list[int]:
        """The worker processes' ids (starting them if need be; this process's with one)."""
        return sorted(self.worker_threads())

    def worker_threads(self) -> dict[int, int]:
        """Each worker process's id and its number of intra-op threads (starting them if
        need be; this process's with one worker)."""
        if self.workers == 1:
            return {os.getpid(): torch.get_num_threads()}
        self.start()
        return dict(self._threads_of)

    def search_batches(self, batches: list[Batch]) -> Iterator[list[list[Hypothesis]]]:
        """Each batch's hypotheses in order, the batches shared out between the workers:
        the largest first (padded source tokens), so that the last to finish are small and
        the workers end together (in length order the largest batch came last, and one
        worker waited for the other: docs/decoding.md)."""
        if self.workers == 1:
            yield from super().search_batches(batches)
            return
        self.start()
        pool = self._pool
        assert pool is not None
        try:
            largest_first = sorted(range(len(batches)), key=lambda i: -padded_tokens(batches[i]))
            futures = {i: pool.submit(_search, batches[i]) for i in largest_first}
            for i in range(len(batches)):
                yield futures[i].result()
        except BrokenProcessPool as e:
            with self._lock:
                if self._pool is pool:  # not yet replaced or closed by another thread
                    stop = self._drop()
                    if stop is not None:
                        stop.cancel()  # not at exit: now, without waiting
                    pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                f"a decoding worker process died ({e}); out of memory, or killed? The "
                "translations of this call are lost; the next call starts new workers"
            ) from e

    def close(self) -> None:
        """Stop the worker processes (after the batches they are decoding)."""
        with self._lock:
            stop = self._drop()
        if stop is not None:
            stop()  # runs once: not again at exit

    def _drop(self) -> Finalize | None:
        """Forget the pool; returns what stops it (None without a pool)."""
        stop = self._stop
        self._pool, self._stop, self._threads_of = None, None, {}
        return stop

    def __enter__(self) -> PooledTranslator:
        self.start()
        return self
