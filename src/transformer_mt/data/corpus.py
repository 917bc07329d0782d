"""Raw parallel text: corpora named by path, fetched, read whole or streamed, validated.

A corpus is a path prefix ``P`` naming two files, ``P.<src_lang>`` and ``P.<tgt_lang>``, each
plain text or gzip (``P.<lang>.gz``), one sentence a line, the two aligned line by line.
Which corpora a ``data`` config names, for which directions, is
:mod:`transformer_mt.data.directions`.
"""

from __future__ import annotations

import gzip
import http.client
import itertools
import math
import sys
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from transformer_mt.errors import CorpusError
from transformer_mt.formats.atomic import atomic_write_bytes

__all__ = [
    "CorpusError",
    "ParallelCorpus",
    "decode_lines",
    "fetch_corpus",
    "read_lines",
    "read_parallel",
    "stream_chunks",
]


@dataclass(frozen=True)
class ParallelCorpus:
    """The corpus at path prefix ``prefix``: ``prefix.<src_lang>`` and ``prefix.<tgt_lang>``;
    with ``tag`` (multilingual data) each source sentence is led by that token."""

    prefix: Path
    src_lang: str
    tgt_lang: str
    tag: str | None = None

    @property
    def name(self) -> str:
        """The file name of the prefix, e.g. ``newstest2014``."""
        return self.prefix.name

    @property
    def label(self) -> str:
        """What reports call it: the file name, plus the direction for multilingual data
        (``test_2016_flickr.en-de``)."""
        return self.name if self.tag is None else f"{self.name}.{self.src_lang}-{self.tgt_lang}"

    def side(self, lang: str) -> Path:
        """``P.<lang>`` if it exists, else ``P.<lang>.gz`` (which may not exist either)."""
        plain = self.prefix.with_name(f"{self.prefix.name}.{lang}")
        return plain if plain.is_file() else plain.with_name(plain.name + ".gz")

    @property
    def src_path(self) -> Path:
        """The source-language file: ``P.<src_lang>``, else ``P.<src_lang>.gz``."""
        return self.side(self.src_lang)

    @property
    def tgt_path(self) -> Path:
        """The target-language file: ``P.<tgt_lang>``, else ``P.<tgt_lang>.gz``."""
        return self.side(self.tgt_lang)

    def check_exists(self) -> None:
        """CorpusError naming the first side that is missing."""
        for path in (self.src_path, self.tgt_path):
            if not path.is_file():
                plain = path.with_suffix("") if path.suffix == ".gz" else path
                raise CorpusError(f"corpus file missing: {plain} (nor {plain}.gz)")

    def read(self) -> tuple[list[str], list[str]]:
        """Both sides whole (for val and test sets); CorpusError on any defect."""
        return read_parallel(self.src_path, self.tgt_path)

    def chunks(self, size: int) -> Iterator[tuple[int, bytes, bytes]]:
        """``(first line number, source bytes, target bytes)`` of ``size`` lines at a time,
        each side the raw bytes of its lines joined (decode with :func:`decode_lines`).
        Unequal line counts and unreadable gzip data raise CorpusError naming the file and
        line; bytes are not decoded here."""
        self.check_exists()
        with _open(self.src_path) as src, _open(self.tgt_path) as tgt:
            first = 1
            while True:
                s = _read_lines(src, size, self.src_path, first)
                t = _read_lines(tgt, size, self.tgt_path, first)
                if len(s) != len(t):
                    n_src, n_tgt = first - 1 + len(s), first - 1 + len(t)
                    if len(s) > len(t):
                        n_src += _count_rest(src, self.src_path, n_src)
                    else:
                        n_tgt += _count_rest(tgt, self.tgt_path, n_tgt)
                    raise CorpusError(
                        f"line counts differ: {self.src_path} has {n_src} lines, "
                        f"{self.tgt_path} has {n_tgt}"
                    )
                if not s:
                    return
                yield first, b"".join(s), b"".join(t)
                first += len(s)


def stream_chunks(
    sources: list[ParallelCorpus], max_pairs: int | None, size: int = 20_000
) -> Iterator[tuple[ParallelCorpus, int, bytes, bytes]]:
    """``(corpus, first line, source bytes, target bytes)`` chunks of ``size`` lines of the
    corpora in order, the first ``max_pairs`` pairs of each direction (language pair) only
    (see :meth:`ParallelCorpus.chunks`)."""
    left: dict[tuple[str, str], float] = {}  # pairs each direction may still give
    for corpus in sources:
        direction = (corpus.src_lang, corpus.tgt_lang)
        left.setdefault(direction, math.inf if max_pairs is None else max_pairs)
        if left[direction] <= 0:
            continue
        for first, src, tgt in corpus.chunks(size):
            n = src.count(b"\n")
            if n > left[direction]:
                n = int(left[direction])
                src, tgt = _head(src, n), _head(tgt, n)
            left[direction] -= n
            yield corpus, first, src, tgt
            if left[direction] <= 0:
                break


def _head(data: bytes, n: int) -> bytes:
    """The first ``n`` newline-terminated lines of ``data``."""
    end = -1
    for _ in range(n):
        end = data.index(b"\n", end + 1)
    return data[: end + 1]


def _open(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e}") from e


def _read_lines(f: BinaryIO, n: int, path: Path, first: int) -> list[bytes]:
    """The next ``n`` lines of ``f`` (fewer at its end); CorpusError on a damaged file."""
    lines: list[bytes] = []
    try:
        lines.extend(itertools.islice(f, n))
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip, I/O error
        raise CorpusError(f"{path}: unreadable after line {first - 1 + len(lines)}: {e}") from e
    if lines and not lines[-1].endswith(b"\n"):  # the last line has no newline
        lines[-1] += b"\n"
    return lines


def _count_rest(f: BinaryIO, path: Path, before: int) -> int:
    """The lines left in ``f`` (for the message about unequal line counts)."""
    count = 0
    try:
        for _ in f:
            count += 1
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{path}: unreadable after line {before + count}: {e}") from e
    return count


def decode_lines(data: bytes, path: Path | str, first: int) -> list[str]:
    """Newline-terminated UTF-8 lines (as joined by :meth:`ParallelCorpus.chunks`) as strings
    without their line ends, and without the byte-order mark some editors put at a file's start
    (``first`` 1), which would otherwise stay in the first reference and cost its BLEU; invalid
    UTF-8 raises CorpusError naming ``path`` and the line (``first`` is the number of the
    first line)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise CorpusError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {column})") from e
    if first == 1 and text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    lines.pop()  # after the last newline
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str | Path) -> list[str]:
    """All lines of a (possibly gzipped) UTF-8 text file, without line endings.

    Raises CorpusError naming the file (and line, for bad UTF-8). Anything that can be read
    but a directory will do: a named pipe such as ``<(zcat x.gz)`` or ``/dev/stdin`` too.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus file missing: {path}")
    if path.is_dir():
        raise CorpusError(f"{path} is a directory, not a corpus file")
    with _open(path) as f:
        data = b"".join(_read_lines(f, sys.maxsize, path, 1))
    return decode_lines(data, path, 1)


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Both sides of a corpus; raises CorpusError if their line counts differ."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise CorpusError(
            f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}"
        )
    return src, tgt


def download_gzip(url: str) -> bytes:
    """The bytes of a gzipped file at ``url``, checked whole: as many as the server announced,
    and a gzip stream that decompresses to its end. A connection cut short raises CorpusError
    naming the URL, rather than leaving a truncated file that later runs would take as
    complete."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            announced = response.headers.get("Content-Length")
            data = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise CorpusError(f"cannot download {url}: {e}") from e
    if announced is not None and announced.isdecimal() and len(data) != int(announced):
        raise CorpusError(f"download of {url} cut short: {len(data)} of {announced} bytes")
    try:
        gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"download of {url} is not a complete gzip file: {e}") from e
    return data


def fetch_corpus(
    raw_dir: str | Path,
    splits: Iterable[str],
    langs: Iterable[str],
    shared_dir: str | Path | None,
    url: str | None,
) -> list[Path]:
    """Make sure ``<raw_dir>/<split>.<lang>.gz`` exists for every split and language.

    Files come from ``shared_dir`` when it holds them (a local mirror), else from ``url``
    (``<url>/<split>.<lang>.gz``, the official repository). Files already present are kept.
    Every file is written atomically, so an interrupted fetch never leaves a partial file.
    """
    paths = []
    for split in dict.fromkeys(splits):
        for lang in langs:
            dest = Path(raw_dir) / f"{split}.{lang}.gz"
            paths.append(dest)
            if dest.is_file() or dest.with_suffix("").is_file():
                continue
            local = Path(shared_dir) / dest.name if shared_dir else None
            if local is not None and local.is_file():
                atomic_write_bytes(dest, lambda f, src=local: f.write(src.read_bytes()))
            elif url:
                remote = f"{url.rstrip('/')}/{dest.name}"
                print(f"downloading {remote}", file=sys.stderr, flush=True)
                atomic_write_bytes(dest, lambda f, remote=remote: f.write(download_gzip(remote)))
            else:
                raise CorpusError(f"corpus file missing: {dest} (no shared_dir copy, no url)")
    return paths
