"""Prepared data: every split encoded once into integer arrays cached on disk.

Layout of ``<prepared_dir>/<name>/``::

    spm.model                 the joint SentencePiece model
    <split>.<lang>.npy        all token ids of a split side, concatenated (uint16/int32)
    <split>.<lang>.offsets.npy  sentence i is tokens[offsets[i]:offsets[i+1]]
    meta.json                 fingerprint of config + inputs, sizes, filter report

The cache is reused while the fingerprint (preparation config + raw file contents) is
unchanged and rebuilt when it changes. It is built in a temporary folder and renamed
into place, so an interrupted preparation never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from transformer_mt.data.corpus import corpus_file, fetch_corpus, read_parallel
from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
from transformer_mt.formats.atomic import atomic_directory

FORMAT_VERSION = 1


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
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
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

    def split(self, name: str) -> EncodedSplit:
        """Load split ``name`` ("train", "valid" or "test") memory-mapped."""
        split = self.meta["splits"][name]
        src, tgt = self.meta["src_lang"], self.meta["tgt_lang"]

        def load(lang: str, suffix: str) -> np.ndarray:
            return np.load(self.directory / f"{split}.{lang}{suffix}.npy", mmap_mode="r")

        return EncodedSplit(
            load(src, ""), load(src, ".offsets"), load(tgt, ""), load(tgt, ".offsets")
        )


def split_names(data_cfg: DictConfig) -> dict[str, str]:
    """Role -> corpus split name, e.g. {"train": "train", "valid": "val", "test": "test_2016_flickr"}."""
    return {
        "train": data_cfg.train_split,
        "valid": data_cfg.valid_split,
        "test": data_cfg.test_split,
    }


def prepared_name(data_cfg: DictConfig) -> str:
    """Folder name of a prepared corpus, e.g. ``multi30k_en-de_unigram8000``."""
    tok = data_cfg.tokenizer
    return f"{data_cfg.corpus}_{data_cfg.src_lang}-{data_cfg.tgt_lang}_{tok.model_type}{tok.vocab_size}"


def fetch_raw(data_cfg: DictConfig) -> None:
    """Make sure the raw corpus files of this language pair are in ``data.raw_dir``."""
    fetch_corpus(
        data_cfg.raw_dir,
        split_names(data_cfg).values(),
        [data_cfg.src_lang, data_cfg.tgt_lang],
        data_cfg.shared_dir,
        data_cfg.url,
    )


def _fingerprint(data_cfg: DictConfig) -> str:
    settings = OmegaConf.to_container(data_cfg, resolve=True)
    assert isinstance(settings, dict)
    for location_only in ("raw_dir", "shared_dir", "url", "prepared_dir"):
        settings.pop(location_only, None)
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, settings], sort_keys=True).encode())
    for split in split_names(data_cfg).values():
        for lang in (data_cfg.src_lang, data_cfg.tgt_lang):
            h.update(corpus_file(data_cfg.raw_dir, split, lang).read_bytes())
    return h.hexdigest()


def _filter_pairs(
    src: list[list[int]], tgt: list[list[int]], min_len: int, max_len: int, max_ratio: float
) -> list[int]:
    """Indices of pairs whose subword lengths are in [min_len, max_len] with ratio ≤ max_ratio."""
    keep = []
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        ls, lt = len(s), len(t)
        if (
            min_len <= ls <= max_len
            and min_len <= lt <= max_len
            and max(ls, lt) <= max_ratio * min(ls, lt)
        ):
            keep.append(i)
    return keep


def _save_side(directory: Path, stem: str, seqs: list[list[int]], vocab_size: int) -> None:
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for s in seqs for i in s), dtype=dtype, count=int(offsets[-1]))
    np.save(directory / f"{stem}.npy", flat)
    np.save(directory / f"{stem}.offsets.npy", offsets)


def prepare_data(data_cfg: DictConfig, force: bool = False) -> PreparedData:
    """Fetch, validate, tokenize and encode the corpus of ``data_cfg``; reuse a valid cache."""
    fetch_raw(data_cfg)
    fingerprint = _fingerprint(data_cfg)
    directory = Path(data_cfg.prepared_dir) / prepared_name(data_cfg)
    meta_path = directory / "meta.json"
    if not force and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            print(f"using prepared data in {directory}", flush=True)
            return PreparedData(directory, Tokenizer((directory / "spm.model").read_bytes()), meta)
        print(f"config or corpus changed: rebuilding {directory}", flush=True)

    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    texts = {
        role: read_parallel(
            corpus_file(data_cfg.raw_dir, split, src_lang),
            corpus_file(data_cfg.raw_dir, split, tgt_lang),
        )
        for role, split in split_names(data_cfg).items()
    }
    train_src, train_tgt = texts["train"]
    if data_cfg.max_train_pairs is not None:
        train_src, train_tgt = (
            train_src[: data_cfg.max_train_pairs],
            train_tgt[: data_cfg.max_train_pairs],
        )
        texts["train"] = (train_src, train_tgt)

    tok_cfg = data_cfg.tokenizer
    print(f"training SentencePiece ({tok_cfg.model_type}, vocab {tok_cfg.vocab_size})", flush=True)
    tokenizer = Tokenizer(
        train_sentencepiece(
            train_src + train_tgt,
            tok_cfg.vocab_size,
            tok_cfg.model_type,
            tok_cfg.character_coverage,
        )
    )

    sizes: dict[str, int] = {}
    with atomic_directory(directory) as tmp:
        (tmp / "spm.model").write_bytes(tokenizer.model_bytes)
        for role, (src, tgt) in texts.items():
            split = split_names(data_cfg)[role]
            src_ids, tgt_ids = tokenizer.encode(src), tokenizer.encode(tgt)
            if role == "train":
                flt = data_cfg.filter
                keep = _filter_pairs(src_ids, tgt_ids, flt.min_len, flt.max_len, flt.max_ratio)
                dropped = len(src_ids) - len(keep)
                print(
                    f"length/ratio filter dropped {dropped} of {len(src_ids)} training pairs "
                    f"({100 * dropped / max(len(src_ids), 1):.2f}%)",
                    flush=True,
                )
                src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
                sizes["train_dropped"] = dropped
            sizes[role] = len(src_ids)
            _save_side(tmp, f"{split}.{src_lang}", src_ids, tokenizer.vocab_size)
            _save_side(tmp, f"{split}.{tgt_lang}", tgt_ids, tokenizer.vocab_size)
        meta = {
            "fingerprint": fingerprint,
            "src_lang": src_lang,
            "tgt_lang": tgt_lang,
            "splits": split_names(data_cfg),
            "sizes": sizes,
            "vocab_size": tokenizer.vocab_size,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"prepared {sizes} in {directory}", flush=True)
    return PreparedData(directory, tokenizer, meta)
