"""Micro-batching: sentences of concurrent requests decoded together.

Requests put their sentences on a queue; one worker takes what is queued (at most
``max_tokens`` source tokens) and decodes each group of sentences that share search options
(and, for a multilingual model, target language) in one call, in a worker thread (the event
loop keeps accepting requests meanwhile). Decoding does not depend on the batch, so each
sentence gets exactly what it would get alone.

How long a batch waits to fill: clients that send their next sentence once answered (a
closed loop, such as a tool translating a document line by line) come back just after their
batch. So a batch waits, for at most ``timeout`` seconds, until as many sentences have
arrived since the last batch was answered as that batch held; a lone client, whose next
sentence is the one awaited, never waits. Without the wait, 32 such clients settle into two
alternating half batches: those queued while the other half decodes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from transformer_mt.decoding.search import SearchOptions

# An engine's decoding function: sentences, options and target language (None: the model's
# only one) -> per sentence, its n-best list of (translation, score), best first (score None
# where the search has none: greedy).
Decode = Callable[[list[str], SearchOptions, str | None], list[list[tuple[str, float | None]]]]


@dataclass
class _Job:
    text: str
    tokens: int
    options: SearchOptions
    tgt_lang: str | None
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects sentences from concurrent requests into decoding batches."""

    def __init__(
        self,
        decode: Decode,
        count_tokens: Callable[[str], int],
        max_tokens: int = 4096,
        timeout: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.decode, self.count_tokens = decode, count_tokens
        self.max_tokens, self.timeout = max_tokens, timeout
        self.on_batch = on_batch or (lambda n: None)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        # One thread does all the model's work; best the one that loaded it (see tmt-serve).
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.worker: asyncio.Task | None = None
        self.arrived = 0  # sentences queued so far
        self.answered = 0  # sentences in the last batch answered
        self.arrived_then = 0  # ``arrived`` when it was answered

    def start(self) -> None:
        """Start the worker (in the running event loop)."""
        self.worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker and its thread; requests still queued fail."""
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def translate(
        self, texts: list[str], options: SearchOptions, tgt_lang: str | None = None
    ) -> list[list[tuple[str, float | None]]]:
        """The n-best lists of ``texts`` (into ``tgt_lang``, for a multilingual model),
        decoded along with whatever else is queued."""
        loop = asyncio.get_running_loop()
        jobs = [
            _Job(t, self.count_tokens(t), options, tgt_lang, loop.create_future()) for t in texts
        ]
        for job in jobs:
            self.queue.put_nowait(job)
        self.arrived += len(jobs)
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            tokens, deadline = batch[0].tokens, time.monotonic() + self.timeout
            while tokens < self.max_tokens:
                # Wait only for the sentences of the last batch's clients still to come back.
                expected = self.arrived - self.arrived_then < self.answered
                left = deadline - time.monotonic()
                try:
                    job = (
                        await asyncio.wait_for(self.queue.get(), left)
                        if expected and left > 0
                        else self.queue.get_nowait()
                    )
                except (asyncio.QueueEmpty, asyncio.TimeoutError):  # the same class from 3.11 on
                    break
                batch.append(job)
                tokens += job.tokens
            self.answered, self.arrived_then = 0, self.arrived
            groups: dict[tuple[SearchOptions, str | None], list[_Job]] = {}
            for job in batch:
                if not job.future.done():  # not cancelled (its client went away)
                    groups.setdefault((job.options, job.tgt_lang), []).append(job)
            for (options, tgt_lang), jobs in groups.items():
                try:
                    self.on_batch(len(jobs))
                    texts = [job.text for job in jobs]
                    results = await loop.run_in_executor(
                        self.executor, self.decode, texts, options, tgt_lang
                    )
                    for job, result in zip(jobs, results, strict=True):
                        if not job.future.done():
                            job.future.set_result(result)
                    self.answered += len(jobs)
                    self.arrived_then = self.arrived
                except Exception as e:  # these requests fail; the worker goes on
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(e)
