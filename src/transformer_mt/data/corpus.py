"""Raw parallel text: fetch the corpus files, read them, and validate them line by line."""

from __future__ import annotations

import gzip
import shutil
import sys
import urllib.request
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformer_mt.errors import CorpusError
from transformer_mt.formats.atomic import atomic_write_bytes

__all__ = [
    "CorpusError",
    "corpus_file",
    "fetch_corpus",
    "read_lines",
    "read_parallel",
    "read_references",
]


def corpus_file(raw_dir: str | Path, split: str, lang: str) -> Path:
    """Path of one side of one split: ``<raw_dir>/<split>.<lang>.gz``."""
    return Path(raw_dir) / f"{split}.{lang}.gz"


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
    for split in splits:
        for lang in langs:
            dest = corpus_file(raw_dir, split, lang)
            paths.append(dest)
            if dest.is_file():
                continue
            local = corpus_file(shared_dir, split, lang) if shared_dir else None
            if local is not None and local.is_file():
                atomic_write_bytes(dest, lambda f, src=local: f.write(src.read_bytes()))
            elif url:
                remote = f"{url.rstrip('/')}/{dest.name}"
                print(f"downloading {remote}", file=sys.stderr, flush=True)
                try:
                    with urllib.request.urlopen(remote, timeout=60) as response:
                        atomic_write_bytes(dest, lambda f, r=response: shutil.copyfileobj(r, f))
                except OSError as e:
                    raise CorpusError(f"cannot download {remote} to {dest}: {e}") from e
            else:
                raise CorpusError(f"corpus file missing: {dest} (no shared_dir copy, no url)")
    return paths


def read_lines(path: str | Path) -> list[str]:
    """All lines of a (possibly gzipped) UTF-8 text file, without line endings.

    Raises CorpusError naming the file (and line, for bad UTF-8).
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file missing: {path}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # unreadable, truncated or corrupt gzip
        raise CorpusError(f"cannot read {path}: {e}") from e
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise CorpusError(
                f"{path}:{number}: invalid UTF-8 ({e.reason} at byte {e.start})"
            ) from e
    return out


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Both sides of a split; raises CorpusError if their line counts differ."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise CorpusError(
            f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}"
        )
    return src, tgt


def read_references(data_cfg: Any, role: str) -> tuple[list[str], list[str]]:
    """Raw source sentences and references of split ``role`` ("valid" or "test") of the
    corpus a ``data`` config section names; CorpusError if their line counts differ."""
    split = {"valid": data_cfg.valid_split, "test": data_cfg.test_split}[role]
    return read_parallel(
        corpus_file(data_cfg.raw_dir, split, data_cfg.src_lang),
        corpus_file(data_cfg.raw_dir, split, data_cfg.tgt_lang),
    )
