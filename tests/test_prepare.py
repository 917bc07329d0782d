"""Streaming preparation: sampling, parallel encoding, bad input at any line, the lock, and
interrupted preparations."""

from __future__ import annotations

import fcntl
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import REPO, WORDS, synthetic_corpus
from test_data import data_config
from transformer_mt.data import encode
from transformer_mt.data.corpus import ParallelCorpus
from transformer_mt.data.dataset import PreparedData
from transformer_mt.data.prepare import prepare_data, prepared_name
from transformer_mt.data.sample import sample_pairs
from transformer_mt.errors import CorpusError


def plain_corpus(prefix: Path, n: int, seed: int = 0, bad_line: int | None = None) -> None:
    """``prefix.en`` / ``prefix.xx`` (plain text): n random word pairs, the target upper-cased;
    with ``bad_line``, that line of the target holds an invalid UTF-8 byte."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    lines = [" ".join(words[rng.integers(0, len(WORDS), rng.integers(2, 9))]) for _ in range(n)]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.en").write_text("".join(s + "\n" for s in lines))
    tgt = "".join(s.upper() + "\n" for s in lines).encode()
    if bad_line is not None:
        start = sum(len(s) + 1 for s in lines[: bad_line - 1])
        tgt = tgt[:start] + b"\xff" + tgt[start + 1 :]
    Path(f"{prefix}.xx").write_bytes(tgt)


def text_config(root: Path, train: list[Path], **overrides: object) -> DictConfig:
    synthetic_corpus(root / "raw", n_train=5)  # val and test sets
    cfg = data_config(root / "raw", root / "prepared", **overrides)
    cfg.train = [str(p) for p in train]
    return cfg


def test_the_sample_is_seeded_uniform_and_in_corpus_order(tmp_path: Path) -> None:
    plain_corpus(tmp_path / "a", 3000, seed=1)
    plain_corpus(tmp_path / "b", 2000, seed=2)
    corpora = [ParallelCorpus(tmp_path / name, "en", "xx") for name in ("a", "b")]
    src, tgt = sample_pairs(corpora, 500, seed=7)
    assert (src, tgt) == sample_pairs(corpora, 500, seed=7)  # deterministic for a seed
    assert src != sample_pairs(corpora, 500, seed=8)[0]
    assert len(src) == 500 and tgt == [s.upper() for s in src]  # pairs stay pairs
    everything = [line for c in "ab" for line in (tmp_path / f"{c}.en").read_text().splitlines()]
    positions = [everything.index(s) for s in src]  # (the first equal line; close enough)
    assert sum(p >= 3000 for p in positions) in range(130, 270)  # both corpora, ~2/5 from b
    whole = sample_pairs(corpora, 10_000, seed=7)
    assert whole[0] == everything  # a corpus smaller than the sample: all of it, in order
    assert len(sample_pairs(corpora, 10_000, seed=7, max_pairs=1234)[0]) == 1234


def test_parallel_encoding_writes_the_same_bytes_as_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain_corpus(tmp_path / "c" / "one", 30_000, seed=3)
    plain_corpus(tmp_path / "c" / "two", 12_345, seed=4)
    train = [tmp_path / "c" / "one", tmp_path / "c" / "two"]
    monkeypatch.setattr(encode, "CHUNK_LINES", 4000)  # many chunks, out of step with workers
    monkeypatch.setattr(encode, "INLINE_BYTES", 0)  # worker processes even for this size
    single = prepare_data(
        text_config(tmp_path / "s", train, num_workers=1, **{"filter.max_len": 8})
    )
    parallel = prepare_data(
        text_config(tmp_path / "p", train, num_workers=2, **{"filter.max_len": 8})
    )
    files = sorted(p.name for p in single.directory.iterdir() if p.name != "meta.json")
    assert files == sorted(p.name for p in parallel.directory.iterdir() if p.name != "meta.json")
    for name in files:
        assert (single.directory / name).read_bytes() == (parallel.directory / name).read_bytes()
    assert single.meta["train_filtered"] == parallel.meta["train_filtered"] > 0
    assert len(parallel.split("train")) == 42_345 - parallel.meta["train_filtered"]
    src, tgt = parallel.split("train").pair(0)
    assert (
        parallel.tokenizer.decode([tgt.tolist()])[0]
        == parallel.tokenizer.decode([src.tolist()])[0].upper()
    )


def test_a_bad_byte_late_in_a_large_file_names_the_line_and_keeps_the_cache(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "big" / "train"
    plain_corpus(prefix, 120_000, seed=5)
    cfg = text_config(tmp_path, [prefix], num_workers=1)
    good = prepare_data(cfg)
    meta_before = (good.directory / "meta.json").read_bytes()
    plain_corpus(prefix, 120_000, seed=5, bad_line=110_017)
    with pytest.raises(CorpusError, match=r"train\.xx:110017: invalid UTF-8"):
        prepare_data(cfg)
    assert (good.directory / "meta.json").read_bytes() == meta_before
    assert len(PreparedData.load(good.directory).split("train")) == len(good.split("train"))
    assert [p.name for p in good.directory.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_unequal_line_counts_and_a_truncated_gzip_name_the_file(tmp_path: Path) -> None:
    plain_corpus(tmp_path / "u", 50_000)
    with open(tmp_path / "u.xx", "a") as f:
        f.write("ONE MORE\n")
    with pytest.raises(CorpusError, match=r"u\.en has 50000 lines, .*u\.xx has 50001"):
        list(ParallelCorpus(tmp_path / "u", "en", "xx").chunks(20_000))
    data = gzip.compress((tmp_path / "u.en").read_bytes())
    (tmp_path / "u.en").unlink()
    (tmp_path / "u.en.gz").write_bytes(data[: len(data) // 2])  # cut mid-stream
    with pytest.raises(CorpusError, match=r"u\.en\.gz: unreadable after line \d+"):
        list(ParallelCorpus(tmp_path / "u", "en", "xx").chunks(20_000))


def test_duplicates_are_dropped_on_request(tmp_path: Path) -> None:
    prefix = tmp_path / "d" / "train"
    prefix.parent.mkdir()
    Path(f"{prefix}.en").write_text("a dog\na cat\na dog\na dog\n")
    Path(f"{prefix}.xx").write_text("A DOG\nA CAT\nA DOG\nANOTHER DOG\n")
    kept = prepare_data(text_config(tmp_path, [prefix], **{"filter.dedup": True}))
    assert kept.meta["train_duplicates"] == 1 and len(kept.split("train")) == 3
    assert len(prepare_data(text_config(tmp_path, [prefix])).split("train")) == 4


def prepare_command(cfg: DictConfig) -> list[str]:
    """``prepare_data(cfg)`` in another Python process."""
    script = (
        "import sys; from omegaconf import OmegaConf; "
        "from transformer_mt.data.prepare import prepare_data; "
        "prepare_data(OmegaConf.create(sys.argv[1]))"
    )
    return [sys.executable, "-c", script, OmegaConf.to_yaml(cfg)]


def test_a_second_preparation_waits_for_the_lock(tmp_path: Path) -> None:
    plain_corpus(tmp_path / "l" / "train", 2000)
    cfg = text_config(tmp_path, [tmp_path / "l" / "train"])
    (tmp_path / "prepared").mkdir()
    lock_path = tmp_path / "prepared" / f".{prepared_name(cfg)}.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as if another preparation were running
        proc = subprocess.Popen(prepare_command(cfg), stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("waiting for another writer")
        assert proc.poll() is None  # still waiting
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert proc.wait(timeout=120) == 0
    assert "prepared" in proc.stdout.read()


def test_a_killed_preparation_leaves_the_previous_cache_usable(tmp_path: Path) -> None:
    prefix = tmp_path / "k" / "train"
    plain_corpus(prefix, 1000)
    cfg = text_config(tmp_path, [prefix], num_workers=1, **{"tokenizer.sample_sentences": 2000})
    old = prepare_data(cfg)
    old_meta, old_pairs = (old.directory / "meta.json").read_bytes(), len(old.split("train"))
    plain_corpus(prefix, 300_000, seed=9)  # changed: the next preparation rebuilds (slowly)
    proc = subprocess.Popen(prepare_command(cfg), stdout=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "prepared").glob(f".{old.directory.name}.*.tmp/spm.model")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-encoding
    proc.wait()
    assert (old.directory / "meta.json").read_bytes() == old_meta
    assert len(PreparedData.load(old.directory).split("train")) == old_pairs
    rebuilt = prepare_data(cfg)  # the next preparation clears the leftovers
    assert len(rebuilt.split("train")) > old_pairs
    assert list((tmp_path / "prepared").glob("*.tmp")) == []
