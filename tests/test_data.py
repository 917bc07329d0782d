"""Corpus reading/validation, preparation cache, and token-budget batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import synthetic_corpus, write_gz
from transformer_mt.data.batching import collate, iterate_batches, token_batches
from transformer_mt.data.corpus import CorpusError, fetch_corpus, read_lines, read_parallel
from transformer_mt.data.dataset import prepare_data
from transformer_mt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def data_config(raw: Path, prepared: Path, **overrides: object) -> OmegaConf:
    cfg = OmegaConf.create(
        {
            "corpus": "synthetic",
            "src_lang": "en",
            "tgt_lang": "xx",
            "raw_dir": str(raw),
            "shared_dir": None,
            "url": None,
            "prepared_dir": str(prepared),
            "train_split": "train",
            "valid_split": "val",
            "test_split": "test_2016_flickr",
            "max_train_pairs": None,
            "filter": {"min_len": 1, "max_len": 100, "max_ratio": 3.0},
            "tokenizer": {"vocab_size": 60, "model_type": "unigram", "character_coverage": 1.0},
        }
    )
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.de.gz"
    write_gz(path, b"gut\nauch gut\nschlecht \xff\xfe\n")
    with pytest.raises(CorpusError, match=r"bad\.de\.gz:3: invalid UTF-8"):
        read_lines(path)


def test_unequal_line_counts_name_both_files(tmp_path: Path) -> None:
    write_gz(tmp_path / "a.en.gz", b"one\ntwo\n")
    write_gz(tmp_path / "a.de.gz", b"eins\n")
    with pytest.raises(CorpusError, match=r"a\.en\.gz has 2 lines, .*a\.de\.gz has 1"):
        read_parallel(tmp_path / "a.en.gz", tmp_path / "a.de.gz")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"nothere\.en\.gz"):
        read_lines(tmp_path / "nothere.en.gz")
    with pytest.raises(CorpusError, match=r"missing: .*train\.en\.gz"):
        fetch_corpus(tmp_path / "raw", ["train"], ["en"], shared_dir=None, url=None)


def test_read_lines_keeps_empty_lines_and_strips_crlf(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"a\r\n\nb c\n")
    assert read_lines(path) == ["a", "", "b c"]


def test_fetch_copies_from_shared_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    synthetic_corpus(shared, n_train=5)
    paths = fetch_corpus(tmp_path / "raw", ["train", "val"], ["en", "xx"], shared, url=None)
    assert len(paths) == 4
    for p in paths:
        assert p.read_bytes() == (shared / p.name).read_bytes()


def test_prepare_caches_and_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    synthetic_corpus(raw)
    cfg = data_config(raw, prepared)
    first = prepare_data(cfg)
    train = first.split("train")
    assert len(train) == 300 and len(first.split("valid")) == 20
    src, tgt = train.pair(0)
    original = read_lines(raw / "train.en.gz")[0]
    assert first.tokenizer.decode([src.tolist()]) == [original]
    assert first.tokenizer.decode([tgt.tolist()]) == [original.upper()]
    capsys.readouterr()

    again = prepare_data(cfg)
    assert "using prepared data" in capsys.readouterr().out
    assert again.directory == first.directory

    changed = prepare_data(data_config(raw, prepared, **{"filter.max_len": 4}))
    out = capsys.readouterr().out
    assert "rebuilding" in out and "dropped" in out
    assert changed.meta["sizes"]["train_dropped"] > 0
    assert len(changed.split("train")) == 300 - changed.meta["sizes"]["train_dropped"]
    assert changed.split("train").src_lengths.max() <= 4

    write_gz(raw / "val.xx.gz", b"ANDERS\n" * 20)  # corpus changed -> rebuild
    prepare_data(data_config(raw, prepared, **{"filter.max_len": 4}))
    assert "rebuilding" in capsys.readouterr().out


def test_token_batches_cover_every_example_within_budget() -> None:
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = token_batches(src_len, tgt_len, max_tokens=300, rng=np.random.default_rng(1))
    seen = np.sort(np.concatenate(batches))
    assert np.array_equal(seen, np.arange(500))
    for b in batches:
        longest = max(src_len[b].max(), tgt_len[b].max()) + 1
        assert longest * len(b) <= 300
    again = token_batches(src_len, tgt_len, max_tokens=300, rng=np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))
    other = token_batches(src_len, tgt_len, max_tokens=300, rng=np.random.default_rng(2))
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other, strict=False))


def test_collate_adds_bos_eos_and_padding(tmp_path: Path) -> None:
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    synthetic_corpus(raw, n_train=50)
    split = prepare_data(data_config(raw, prepared)).split("train")
    batch = collate(split, np.array([0, 1]), PAD_ID, BOS_ID, EOS_ID)
    for row, i in enumerate((0, 1)):
        s, t = split.pair(i)
        assert batch.src[row, : len(s) + 1].tolist() == [*s.tolist(), EOS_ID]
        assert batch.tgt_in[row, : len(t) + 1].tolist() == [BOS_ID, *t.tolist()]
        assert batch.tgt_out[row, : len(t) + 1].tolist() == [*t.tolist(), EOS_ID]
        assert (batch.tgt_out[row, len(t) + 1 :] == PAD_ID).all()
    assert batch.n_tgt_tokens == sum(len(split.pair(i)[1]) + 1 for i in (0, 1))


def test_collate_lists_the_real_target_positions(tmp_path: Path) -> None:
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    synthetic_corpus(raw, n_train=50)
    split = prepare_data(data_config(raw, prepared)).split("train")
    shortest, longest = np.argmin(split.tgt_lengths), np.argmax(split.tgt_lengths)
    assert split.tgt_lengths[shortest] < split.tgt_lengths[longest]  # the batch has padding
    indices = np.array([shortest, longest])
    batch = collate(split, indices, PAD_ID, BOS_ID, EOS_ID)
    expected = [tok for i in indices for tok in [*split.pair(int(i))[1].tolist(), EOS_ID]]
    assert batch.real_targets().tolist() == expected  # row by row, no padding
    width = batch.tgt_out.size(1)
    short_len = int(split.tgt_lengths[shortest]) + 1
    assert batch.tgt_positions.tolist()[:short_len] == list(range(short_len))
    assert batch.tgt_positions.tolist()[short_len:] == list(range(width, 2 * width))
    assert batch.n_tgt_tokens == len(expected)


def test_evaluation_batches_truncate_long_sentences(tmp_path: Path) -> None:
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    synthetic_corpus(raw, n_train=50)
    split = prepare_data(data_config(raw, prepared)).split("valid")
    batches = list(iterate_batches(split, 10_000, PAD_ID, BOS_ID, EOS_ID, max_len=3))
    assert sum(b.src.size(0) for b in batches) == len(split)
    for b in batches:
        assert b.src.size(1) <= 4 and b.tgt_in.size(1) <= 4  # 3 subwords + EOS/BOS
