"""Preparation: raw parallel text -> SentencePiece -> token arrays on disk, streamed.

No corpus is ever held in memory. Preparation makes two passes over the training corpora:

1. **Sample.** A seeded uniform sample of at most ``data.tokenizer.sample_sentences``
   sentences (half source, half target, as sentence pairs) is drawn in one pass (each pair
   gets a random key; the pairs with the smallest keys are kept), and SentencePiece is
   trained on it. A corpus smaller than the sample is used whole, in file order. A given
   SentencePiece model (a fine-tuning run's, ``data.tokenizer.from_checkpoint``) replaces
   this pass; its sha256 is part of the settings.
2. **Encode.** Chunks of lines are decoded (UTF-8 checked, the bad line named), encoded and
   length/ratio-filtered in ``data.num_workers`` processes; the main process appends their
   token and offset arrays to the split's files in input order, drops exact duplicate pairs
   on request (``data.filter.dedup``) and counts what was dropped.

The cache folder is built under a temporary name and renamed into place when complete, so an
interrupted preparation leaves the previous cache as it was; a lock file makes a second
preparation of the same corpus wait instead of racing. The cache is reused while its
fingerprint (the settings, and each file's path, size, modification time and first and last
MiB) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from transformer_mt.data.corpus import ParallelCorpus, decode_lines
from transformer_mt.data.dataset import FORMAT_VERSION, PreparedData
from transformer_mt.data.directions import corpora, fetch_raw, is_multilingual, target_tags
from transformer_mt.data.encode import LengthFilter, encode_split, open_pool
from transformer_mt.data.sample import train_tokenizer
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.errors import ConfigError, CorpusError
from transformer_mt.formats.atomic import atomic_directory, atomic_write_text, directory_lock

EDGE_BYTES = 1 << 20  # the fingerprint hashes this much of each file's start and end


# -- settings, names, fingerprint ---------------------------------------------------------------


# ``data`` keys that do not change what a run trains on: where files are found or written,
# how many workers prepare them, and the test sets (scored at the end, never trained on).
NOT_CONTENT = ("raw_dir", "shared_dir", "url", "prepared_dir", "num_workers", "test")


def _settings(data_cfg: DictConfig, spm_model: bytes | None = None) -> dict[str, Any]:
    """What decides the prepared arrays: every ``data`` key but locations, worker count and
    test sets (which are not prepared), with the corpora as absolute paths, and the sha256 of
    a given SentencePiece model ``spm_model``."""
    settings = OmegaConf.to_container(data_cfg, resolve=True)
    assert isinstance(settings, dict)
    for not_content in NOT_CONTENT:
        settings.pop(not_content, None)
    settings["tokenizer"].pop("from_checkpoint", None)  # the hash below stands for it
    if spm_model is not None:
        settings["tokenizer"]["spm_model_sha256"] = hashlib.sha256(spm_model).hexdigest()
    for role in ("train", "valid"):  # each corpus with its direction, in a multilingual config
        settings[role] = [
            str(c.prefix.resolve()) + ("" if c.tag is None else f" {c.src_lang}-{c.tgt_lang}")
            for c in corpora(data_cfg, role)
        ]
    return settings


def prepared_name(data_cfg: DictConfig, spm_model: bytes | None = None) -> str:
    """Folder name of a prepared corpus, e.g. ``multi30k_en-de_unigram8000_3f9a1c2e``: the
    corpus, languages and vocabulary, and a hash of the settings (so corpora do not share
    a folder)."""
    tok = data_cfg.tokenizer
    digest = hashlib.sha256(json.dumps(_settings(data_cfg, spm_model), sort_keys=True).encode())
    return (
        f"{data_cfg.corpus}_{data_cfg.src_lang}-{data_cfg.tgt_lang}_"
        f"{tok.model_type}{tok.vocab_size}_{digest.hexdigest()[:8]}"
    )


def _file_fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            h.update(f.read())
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, h.hexdigest()]


def fingerprint(data_cfg: DictConfig, spm_model: bytes | None = None) -> str:
    """A hash of the settings and of every input file's path, size, mtime and edges: cheap
    on multi-GB files, and any edit of a file changes its size, mtime or both."""
    files = [
        _file_fingerprint(path)
        for role in ("train", "valid")
        for corpus in corpora(data_cfg, role)
        for path in (corpus.src_path, corpus.tgt_path)
    ]
    blob = json.dumps([FORMAT_VERSION, _settings(data_cfg, spm_model), files], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- the whole preparation -----------------------------------------------------------------------


def prepare_data(
    data_cfg: DictConfig, force: bool = False, spm_model: bytes | None = None
) -> PreparedData:
    """Fetch and check the corpora of ``data_cfg``, then reuse its prepared cache or build it
    (see the module doc), tokenized with ``spm_model`` when given, else with a SentencePiece
    model trained here. The test sets are read through once, so a defect in them is found
    now rather than after training."""
    if data_cfg.tokenizer.get("from_checkpoint", False) and spm_model is None:
        raise ConfigError(
            "data.tokenizer.from_checkpoint=true but no checkpoint's SentencePiece model was "
            "given (it comes from trainer.init_from)"
        )
    fetch_raw(data_cfg)
    train, valid, tests = (corpora(data_cfg, role) for role in ("train", "valid", "test"))
    for corpus in (*train, *valid, *tests):
        corpus.check_exists()
    for corpus in (*valid, *tests):
        if not check_text(corpus):
            raise CorpusError(
                f"{corpus.src_path} and {corpus.tgt_path} are empty: no sentences to "
                "validate or test on"
            )
    directory = Path(data_cfg.prepared_dir) / prepared_name(data_cfg, spm_model)
    key = fingerprint(data_cfg, spm_model)
    if not force and _current(directory, key):  # no lock needed to read (read-only caches)
        print(f"using prepared data in {directory}", flush=True)
        return PreparedData.load(directory)
    with directory_lock(directory):
        if not force and _current(directory, key):  # built while we waited for the lock
            print(f"using prepared data in {directory}", flush=True)
            return PreparedData.load(directory)
        if (directory / "meta.json").is_file():
            print(f"config or corpus changed: rebuilding {directory}", flush=True)
        return _build(data_cfg, directory, key, train, valid, spm_model)


def _current(directory: Path, key: str) -> bool:
    """Whether ``directory`` holds a complete cache with fingerprint ``key``."""
    meta = directory / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == key


def check_text(corpus: ParallelCorpus) -> int:
    """Read ``corpus`` through and return its number of lines: CorpusError on invalid UTF-8,
    unequal line counts or a damaged file, naming the file and line."""
    lines = 0
    for first, src, tgt in corpus.chunks(100_000):
        lines += len(decode_lines(src, corpus.src_path, first))
        decode_lines(tgt, corpus.tgt_path, first)
    return lines


def _build(
    data_cfg: DictConfig,
    directory: Path,
    key: str,
    train: list[ParallelCorpus],
    valid: list[ParallelCorpus],
    spm_model: bytes | None,
) -> PreparedData:
    start = time.perf_counter()
    tokenizer = Tokenizer(spm_model) if spm_model else train_tokenizer(data_cfg, train)
    sample_seconds = time.perf_counter() - start
    missing = [tag for tag in target_tags(data_cfg) if tokenizer.piece_id(tag) is None]
    if missing:  # a SentencePiece model reused from a checkpoint of other languages
        raise ConfigError(f"data.pairs: the SentencePiece model has no piece for {missing}")
    sides = ("src", "tgt") if is_multilingual(data_cfg) else None  # languages on both sides
    dtype = "uint16" if tokenizer.vocab_size <= np.iinfo(np.uint16).max else "int32"
    flt = data_cfg.filter
    length_filter = LengthFilter(flt.min_len, flt.max_len, flt.max_ratio)
    with atomic_directory(directory) as tmp, open_pool(data_cfg, train, tokenizer) as pool:
        (tmp / "spm.model").write_bytes(tokenizer.model_bytes)
        reports = {
            "train": encode_split(
                pool, train, tmp, "train", dtype, length_filter,
                bool(flt.get("dedup", False)), data_cfg.max_train_pairs, "encoding train", sides,
            ),
            "valid": encode_split(
                pool, valid, tmp, "valid", dtype, desc="encoding valid", sides=sides
            ),
        }  # fmt: skip
        t = reports["train"]
        if not t.pairs:
            raise CorpusError(
                f"no training pairs: {', '.join(str(c.src_path) for c in train)} (and their "
                f"targets) hold {t.pairs_in}; the length/ratio filter (data.filter) dropped "
                f"{t.filtered} and the duplicate filter {t.duplicates}"
            )
        print(
            f"length/ratio filter dropped {t.filtered} of {t.pairs_in} training pairs "
            f"({100 * t.filtered / max(t.pairs_in, 1):.2f}%)"
            + (f"; {t.duplicates} exact duplicates dropped" if flt.get("dedup") else ""),
            flush=True,
        )
        meta = {
            "format": FORMAT_VERSION,
            "fingerprint": key,
            "src_lang": data_cfg.src_lang,
            "tgt_lang": data_cfg.tgt_lang,
            **({"pairs": list(data_cfg.pairs), "sides": list(sides)} if sides else {}),
            "dtype": dtype,
            "vocab_size": tokenizer.vocab_size,
            "sizes": {role: r.pairs for role, r in reports.items()},
            "train_pairs_in": t.pairs_in,
            "train_filtered": t.filtered,
            "train_duplicates": t.duplicates,
            "seconds": {
                "sample_and_tokenizer": round(sample_seconds, 2),
                "encode_train": round(t.seconds, 2),
                "encode_valid": round(reports["valid"].seconds, 2),
            },
        }
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    print(f"prepared {meta['sizes']} in {directory}", flush=True)
    return PreparedData.load(directory)
