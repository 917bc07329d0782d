"""Prepared data on disk: the encoded splits of a corpus, read memory-mapped.

Layout of ``<prepared_dir>/<name>/`` (written by :mod:`transformer_mt.data.prepare`)::

    spm.model                    the joint SentencePiece model
    <role>.<side>.tokens         all token ids of a side, concatenated (meta.json: dtype)
    <role>.<side>.offsets        int64: sentence i is tokens[offsets[i]:offsets[i+1]]
    meta.json                    fingerprint, languages, sizes, filter report, dtype

``<role>`` is ``train`` or ``valid``; ``<side>`` is the source or target language, or for
multilingual data (several pairs, meta.json ``sides``) ``src`` and ``tgt``. Nothing is read
into memory up front: a split of any size opens in constant time and memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.errors import CorpusError

FORMAT_VERSION = 3  # 3: no byte-order mark in the first line; duplicates counted per direction


def open_array(path: Path, dtype: str) -> np.ndarray:
    """A raw binary array file, memory-mapped read-only (an empty file gives an empty array)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class EncodedSplit:
    """One split, both sides, as memory-mapped token arrays."""

    src_tokens: np.ndarray
    src_offsets: np.ndarray
    tgt_tokens: np.ndarray
    tgt_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        """Each source sentence's stored length in tokens (a language tag included; EOS is
        added by ``collate``): (N,)."""
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
        """Each target sentence's stored length in tokens (BOS/EOS are added by ``collate``):
        (N,)."""
        return np.diff(self.tgt_offsets)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of sentence pair ``i`` (source, target)."""
        return (
            self.src_tokens[self.src_offsets[i] : self.src_offsets[i + 1]],
            self.tgt_tokens[self.tgt_offsets[i] : self.tgt_offsets[i + 1]],
        )


@dataclass
class PreparedData:
    """A prepared corpus: its folder, tokenizer and encoded splits."""

    directory: Path
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> PreparedData:
        """Open a prepared folder (its arrays stay on disk)."""
        meta = json.loads((directory / "meta.json").read_text())
        return cls(directory, Tokenizer((directory / "spm.model").read_bytes()), meta)

    def split(self, role: str) -> EncodedSplit:
        """Split ``role`` ("train" or "valid"), memory-mapped."""
        if role not in self.meta["sizes"]:
            raise CorpusError(f"{self.directory} holds no '{role}' split")
        src, tgt = self.meta.get("sides") or (self.meta["src_lang"], self.meta["tgt_lang"])
        dtype = self.meta["dtype"]

        def side(lang: str) -> tuple[np.ndarray, np.ndarray]:
            stem = self.directory / f"{role}.{lang}"
            tokens = open_array(stem.with_name(stem.name + ".tokens"), dtype)
            return tokens, open_array(stem.with_name(stem.name + ".offsets"), "int64")

        return EncodedSplit(*side(src), *side(tgt))
