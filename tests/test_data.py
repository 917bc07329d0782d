"""Corpus reading/validation, preparation cache, and token-budget batching."""

from __future__ import annotations

import gzip
import io
import itertools
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import synthetic_corpus, write_gz
from transformer_mt.data import loader
from transformer_mt.data.batching import collate, iterate_batches, pad, token_batches
from transformer_mt.data.corpus import CorpusError, fetch_corpus, read_lines, read_parallel
from transformer_mt.data.loader import Prefetcher
from transformer_mt.data.prepare import prepare_data
from transformer_mt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def data_config(raw: Path, prepared: Path, **overrides: object) -> OmegaConf:
    cfg = OmegaConf.create(
        {
            "corpus": "synthetic",
            "src_lang": "en",
            "tgt_lang": "xx",
            "train": [str(raw / "train")],
            "valid": str(raw / "val"),
            "test": [str(raw / "test_2016_flickr")],
            "raw_dir": None,
            "shared_dir": None,
            "url": None,
            "prepared_dir": str(prepared),
            "num_workers": None,
            "max_train_pairs": None,
            "filter": {"min_len": 1, "max_len": 100, "max_ratio": 3.0, "dedup": False},
            "tokenizer": {
                "vocab_size": 60,
                "model_type": "unigram",
                "character_coverage": 1.0,
                "sample_sentences": 1_000_000,
                "seed": 1,
            },
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


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path: Path) -> None:
    write_gz(tmp_path / "ref.de.gz", "\ufeffein Hund\nzwei\n".encode())
    assert read_lines(tmp_path / "ref.de.gz") == ["ein Hund", "zwei"]


class FakeResponse(io.BytesIO):
    """What ``urllib.request.urlopen`` returns: a body, and the length the server announced."""

    def __init__(self, body: bytes, announced: int | None) -> None:
        super().__init__(body)
        self.headers = {} if announced is None else {"Content-Length": str(announced)}

    def __enter__(self) -> FakeResponse:
        return self


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
def test_a_download_cut_short_is_an_error_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, announced: bool
) -> None:
    whole = gzip.compress("".join(f"a dog {i}\n" for i in range(2000)).encode())
    body = {"cut": whole[: len(whole) // 2], "whole": whole}

    def fetch(part: str) -> list[Path]:
        response = FakeResponse(body[part], len(whole) if announced else None)
        monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: response)
        return fetch_corpus(tmp_path / "raw", ["train"], ["en"], None, "http://mt.example/m30k")

    with pytest.raises(CorpusError, match=r"http://mt\.example/m30k/train\.en\.gz"):
        fetch("cut")
    assert not (tmp_path / "raw" / "train.en.gz").exists()
    assert not list((tmp_path / "raw").iterdir())  # no temporary file either
    [path] = fetch("whole")
    assert path.read_bytes() == whole


@pytest.mark.parametrize("empty", ["train", "val", "test_2016_flickr"])
def test_an_empty_corpus_is_refused_naming_it(tmp_path: Path, empty: str) -> None:
    raw = tmp_path / "raw"
    synthetic_corpus(raw)
    for lang in ("en", "xx"):
        write_gz(raw / f"{empty}.{lang}.gz", b"")
    with pytest.raises(CorpusError, match=rf"{empty}\.en\.gz"):
        prepare_data(data_config(raw, tmp_path / "prepared"))
    assert not list((tmp_path / "prepared").glob("*/meta.json"))  # no cache written


def test_a_filter_that_drops_every_pair_is_an_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    synthetic_corpus(raw)
    message = r"no training pairs: .*train\.en\.gz .*hold 300; .*\(data\.filter\) dropped 300"
    with pytest.raises(CorpusError, match=message):
        prepare_data(data_config(raw, tmp_path / "prepared", **{"filter.max_len": 1}))
    assert not list((tmp_path / "prepared").glob("*/meta.json"))


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
    assert "dropped" in out  # other settings: another cache, the first one kept
    assert changed.directory != first.directory and (first.directory / "meta.json").is_file()
    assert changed.meta["train_filtered"] > 0
    assert len(changed.split("train")) == 300 - changed.meta["train_filtered"]
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


def reference_token_batches(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """The per-example loop that token_batches replaced (kept to check it gives the same)."""
    n = len(src_lengths)
    src_len, tgt_len = np.asarray(src_lengths) + 1, np.asarray(tgt_lengths) + 1
    order = np.lexsort((rng.random(n), src_len, tgt_len))
    batches, start, longest = [], 0, 0
    for pos in range(n):
        i = order[pos]
        longest_with_i = max(longest, src_len[i], tgt_len[i])
        if pos > start and longest_with_i * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, longest_with_i = pos, max(src_len[i], tgt_len[i])
        longest = longest_with_i
    if start < n:
        batches.append(order[start:n])
    rng.shuffle(batches)
    return batches


@pytest.mark.parametrize("max_tokens", [7, 64, 300, 4096])
def test_vectorised_batching_gives_the_reference_batches(max_tokens: int) -> None:
    rng = np.random.default_rng(max_tokens)
    src_len, tgt_len = rng.integers(0, 60, 5000), rng.integers(0, 60, 5000)
    src_len[:3] = 500  # longer than the smaller budgets on their own
    ours = token_batches(src_len, tgt_len, max_tokens, np.random.default_rng(3))
    reference = reference_token_batches(src_len, tgt_len, max_tokens, np.random.default_rng(3))
    assert len(ours) == len(reference)
    assert all(np.array_equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_vectorised_collate_gives_the_reference_tensors(tmp_path: Path) -> None:
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    synthetic_corpus(raw, n_train=120)
    split = prepare_data(data_config(raw, prepared)).split("train")
    indices = np.random.default_rng(0).permutation(len(split))[:37]
    for max_len in (None, 3):
        batch = collate(split, indices, PAD_ID, BOS_ID, EOS_ID, max_len)
        srcs, tgt_ins, tgt_outs = [], [], []  # the per-sentence construction it replaced
        for i in indices:
            s, t = (x[:max_len].tolist() for x in split.pair(int(i)))
            srcs.append([*s, EOS_ID])
            tgt_ins.append([BOS_ID, *t])
            tgt_outs.append([*t, EOS_ID])
        assert torch.equal(batch.src, pad(srcs, PAD_ID))
        assert torch.equal(batch.tgt_in, pad(tgt_ins, PAD_ID))
        assert torch.equal(batch.tgt_out, pad(tgt_outs, PAD_ID))
        positions = (pad(tgt_outs, PAD_ID).reshape(-1) != PAD_ID).nonzero().squeeze(1)
        assert torch.equal(batch.tgt_positions, positions)
        assert batch.src.dtype == batch.tgt_positions.dtype == torch.long


def test_the_prefetcher_keeps_order_counts_waiting_and_passes_errors_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = itertools.count()  # a clock that moves one second each time it is read
    monkeypatch.setattr(loader.time, "perf_counter", lambda: float(next(ticks)))
    with Prefetcher(lambda x: x * x, range(10), depth=3) as ahead:
        assert list(ahead) == [x * x for x in range(10)]
        assert ahead.wait_seconds == 10.0  # one second of waiting counted per item

    def fail_at_5(x: int) -> int:
        if x == 5:
            raise ValueError("bad batch 5")
        return x

    with Prefetcher(fail_at_5, range(10)) as ahead:
        assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(ValueError, match="bad batch 5"):
            next(ahead)
