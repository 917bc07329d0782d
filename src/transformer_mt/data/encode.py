"""Encoding: chunks of raw lines -> filtered token arrays, in worker processes, written to a
split's files in input order."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from omegaconf import DictConfig

from transformer_mt.data.corpus import ParallelCorpus, decode_lines, stream_chunks
from transformer_mt.data.sample import progress
from transformer_mt.data.tokenizer import Tokenizer

CHUNK_LINES = 20_000  # sentence pairs per encoding task
INLINE_BYTES = 32 << 20  # training corpora smaller than this are encoded in this process


@dataclass(frozen=True)
class LengthFilter:
    """Keep pairs whose subword lengths are in [min_len, max_len] with ratio ≤ max_ratio."""

    min_len: int
    max_len: int
    max_ratio: float

    def keep(self, src_len: np.ndarray, tgt_len: np.ndarray) -> np.ndarray:
        """A boolean mask over the pairs."""
        shorter, longer = np.minimum(src_len, tgt_len), np.maximum(src_len, tgt_len)
        return (
            (shorter >= self.min_len)
            & (longer <= self.max_len)
            & (longer <= self.max_ratio * shorter)
        )


@dataclass
class EncodedChunk:
    """One chunk, encoded and filtered: flat token arrays and lengths of the kept pairs."""

    src_tokens: np.ndarray
    src_lengths: np.ndarray
    tgt_tokens: np.ndarray
    tgt_lengths: np.ndarray
    hashes: np.ndarray | None  # per kept pair, for the duplicate filter
    n_in: int
    n_filtered: int


_WORKER_SP: spm.SentencePieceProcessor | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _WORKER_SP
    _WORKER_SP = spm.SentencePieceProcessor(model_proto=model_bytes)


def _flat(ids: list[list[int]], lengths: np.ndarray, dtype: str) -> np.ndarray:
    flat = np.fromiter((i for seq in ids for i in seq), dtype=np.int64, count=int(lengths.sum()))
    return flat.astype(dtype)


def encode_chunk(
    src: bytes,
    tgt: bytes,
    where: tuple[str, str, int],
    length_filter: LengthFilter | None,
    dedup: bool,
    dtype: str,
    tag: str | None = None,
) -> EncodedChunk:
    """Decode (naming a bad line), encode, filter and flatten one chunk (in a worker); with
    ``tag`` (multilingual data) each source starts with that piece, outside the filter's
    lengths."""
    src_path, tgt_path, first = where
    src_lines, tgt_lines = decode_lines(src, src_path, first), decode_lines(tgt, tgt_path, first)
    assert _WORKER_SP is not None, "encode_chunk runs in a worker started by _init_worker"
    src_ids, tgt_ids = _WORKER_SP.encode(src_lines), _WORKER_SP.encode(tgt_lines)
    if tag is not None:
        tag_id = _WORKER_SP.piece_to_id(tag)
        src_ids = [[tag_id, *ids] for ids in src_ids]
    src_len = np.fromiter(map(len, src_ids), dtype=np.int64, count=len(src_ids))
    tgt_len = np.fromiter(map(len, tgt_ids), dtype=np.int64, count=len(tgt_ids))
    n = len(src_ids)
    text_len = src_len - (tag is not None)  # the filter sees the sentence, not its tag
    keep = (
        np.ones(n, dtype=bool) if length_filter is None else length_filter.keep(text_len, tgt_len)
    )
    hashes = None
    if dedup:
        hashes = np.fromiter(
            (
                _pair_hash(s, t, tag)
                for s, t, k in zip(src_lines, tgt_lines, keep, strict=True)
                if k
            ),
            dtype=np.uint64,
        )
    if not keep.all():
        idx = np.flatnonzero(keep).tolist()
        src_ids, tgt_ids = [src_ids[i] for i in idx], [tgt_ids[i] for i in idx]
        src_len, tgt_len = src_len[keep], tgt_len[keep]
    return EncodedChunk(
        _flat(src_ids, src_len, dtype),
        src_len,
        _flat(tgt_ids, tgt_len, dtype),
        tgt_len,
        hashes,
        n,
        n - len(src_len),
    )


def _pair_hash(src: str, tgt: str, tag: str | None = None) -> int:
    """A pair's hash for the duplicate filter; the same text in two directions (another
    target-language ``tag``) is two examples, not a duplicate."""
    text = f"{tag or ''}\n{src}\n{tgt}"  # no line has \n
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _encode_task(task: tuple[Any, ...]) -> EncodedChunk:
    return encode_chunk(*task)


class _SideWriter:
    """Appends one side's tokens and offsets to ``<stem>.tokens`` / ``<stem>.offsets``."""

    def __init__(self, stem: Path, files: ExitStack) -> None:
        self.tokens = files.enter_context(stem.with_name(stem.name + ".tokens").open("wb"))
        self.offsets = files.enter_context(stem.with_name(stem.name + ".offsets").open("wb"))
        self.offsets.write(np.zeros(1, dtype=np.int64).tobytes())
        self.end = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append the tokens of some sentences and their end offsets."""
        self.tokens.write(tokens.tobytes())
        self.offsets.write((self.end + np.cumsum(lengths)).astype(np.int64).tobytes())
        self.end += int(lengths.sum())


@dataclass
class SplitReport:
    """What encoding one split kept and dropped."""

    pairs_in: int = 0
    pairs: int = 0
    filtered: int = 0  # by the length/ratio filter
    duplicates: int = 0
    seconds: float = 0.0


def encode_split(
    pool: Any,
    sources: list[ParallelCorpus],
    directory: Path,
    role: str,
    dtype: str,
    length_filter: LengthFilter | None = None,
    dedup: bool = False,
    max_pairs: int | None = None,
    desc: str = "encoding",
    sides: tuple[str, str] | None = None,
) -> SplitReport:
    """Encode the corpora ``sources`` (concatenated) into ``<dir>/<role>.<side>.*`` files
    through ``pool`` (results in input order); the sides are named ``sides``, by default
    the languages of the first corpus."""
    sides = sides or (sources[0].src_lang, sources[0].tgt_lang)
    report, seen, start = SplitReport(), set(), time.perf_counter()
    tasks = (
        (src, tgt, (str(c.src_path), str(c.tgt_path), first), length_filter, dedup, dtype, c.tag)
        for c, first, src, tgt in stream_chunks(sources, max_pairs, CHUNK_LINES)
    )
    with ExitStack() as files, progress(desc) as bar:
        writers = [_SideWriter(directory / f"{role}.{side}", files) for side in sides]
        for chunk in pool.imap(_encode_task, tasks):
            if chunk.hashes is not None:
                chunk = _drop_seen(chunk, seen, report)
            writers[0].write(chunk.src_tokens, chunk.src_lengths)
            writers[1].write(chunk.tgt_tokens, chunk.tgt_lengths)
            report.pairs_in += chunk.n_in
            report.filtered += chunk.n_filtered
            report.pairs += len(chunk.src_lengths)
            bar.update(chunk.n_in)
    report.seconds = time.perf_counter() - start
    return report


def _drop_seen(chunk: EncodedChunk, seen: set[int], report: SplitReport) -> EncodedChunk:
    """``chunk`` without the pairs whose hash is in ``seen`` (earlier in the corpus or in this
    chunk); adds the others' hashes to ``seen``."""
    new = np.ones(len(chunk.src_lengths), dtype=bool)
    for i, h in enumerate(chunk.hashes.tolist() if chunk.hashes is not None else []):
        if h in seen:
            new[i] = False
        else:
            seen.add(h)
    if new.all():
        return chunk
    report.duplicates += int((~new).sum())
    return EncodedChunk(
        chunk.src_tokens[np.repeat(new, chunk.src_lengths)],
        chunk.src_lengths[new],
        chunk.tgt_tokens[np.repeat(new, chunk.tgt_lengths)],
        chunk.tgt_lengths[new],
        None,
        chunk.n_in,
        chunk.n_filtered,
    )


class _InProcess:
    """The pool interface, run in this process (small corpora, or ``data.num_workers=1``)."""

    def imap(self, fn: Any, tasks: Iterator[Any]) -> Iterator[Any]:
        return map(fn, tasks)


class _Workers:
    """``imap`` over worker processes with at most ``in_flight`` tasks submitted ahead of the
    results read (``Pool.imap`` would read the whole corpus into its task queue). A worker
    that dies (killed for memory, say) raises BrokenProcessPool instead of hanging."""

    def __init__(self, pool: ProcessPoolExecutor, in_flight: int) -> None:
        self.pool, self.in_flight = pool, in_flight

    def imap(self, fn: Any, tasks: Iterator[Any]) -> Iterator[Any]:
        pending: deque[Future[Any]] = deque()
        for task in tasks:
            pending.append(self.pool.submit(fn, task))
            if len(pending) >= self.in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def open_pool(
    data_cfg: DictConfig, train: list[ParallelCorpus], tokenizer: Tokenizer
) -> Iterator[Any]:
    """Worker processes for encoding, or this process when one worker is asked for or the
    training corpora are under ``INLINE_BYTES`` (starting workers would cost more)."""
    workers = num_workers(data_cfg)
    size = sum(c.src_path.stat().st_size + c.tgt_path.stat().st_size for c in train)
    if workers == 1 or size < INLINE_BYTES:
        _init_worker(tokenizer.model_bytes)
        yield _InProcess()
        return
    context = multiprocessing.get_context("spawn")  # fresh workers, not copies of this process
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer.model_bytes,)
    ) as pool:
        yield _Workers(pool, in_flight=2 * workers)


def num_workers(data_cfg: DictConfig) -> int:
    """``data.num_workers``, or every core this process may use."""
    if data_cfg.get("num_workers"):
        return int(data_cfg.num_workers)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
