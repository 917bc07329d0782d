"""The file formats at the bottom of the package: atomic writes and results.json."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest

from transformer_mt.errors import ResultsError
from transformer_mt.formats import atomic
from transformer_mt.formats.atomic import (
    atomic_directory,
    atomic_link,
    atomic_write_text,
    directory_lock,
)
from transformer_mt.formats.results import CheckpointResult, RunResults, Score


def test_atomic_directory_replaces_the_target_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"  # the old directory is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind

    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", ["system", "unavailable"])
def test_replacing_a_directory_never_leaves_the_target_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: str
) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    if exchange == "unavailable":  # another OS or filesystem: the two-rename fallback
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    else:  # Linux: one atomic swap, so no moment exists without a complete target
        (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
        if not atomic._exchange(tmp_path / "x", tmp_path / "y"):
            pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
        (tmp_path / "x").rmdir(), (tmp_path / "y").rmdir()
        renames = []
        real_replace = os.replace

        def recording_replace(src: object, dst: object) -> None:
            renames.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", recording_replace)
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old one and temporaries gone
    if exchange == "system":
        assert renames == []  # the target was never renamed away


@pytest.mark.parametrize("exchange", ["system", "unavailable"])
@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_link_in_the_way_is_replaced_by_the_directory_without_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: str, kind: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.txt").write_text("not ours")
    work = tmp_path / "work"
    work.mkdir()
    target = work / "out"
    if kind == "file":
        target.write_text("old file")
    else:
        target.symlink_to(elsewhere, target_is_directory=True)
    if exchange == "unavailable":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert not target.is_symlink() and (target / "b.txt").read_text() == "new"
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # no hidden sibling left behind
    assert (elsewhere / "kept.txt").read_text() == "not ours"  # a link's directory untouched


def test_a_directory_lock_is_exclusive_and_removed_on_release(tmp_path: Path) -> None:
    target = tmp_path / "out"
    (tmp_path / ".out.x.tmp").mkdir()  # a killed writer's leftover
    (tmp_path / ".other.x.tmp").mkdir()  # another directory's: not ours to remove
    with directory_lock(target):
        lock_path = tmp_path / ".out.lock"
        with open(lock_path, "a+b") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x.tmp", ".out.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x.tmp"]
    with directory_lock(target):  # free again
        pass


def test_a_waiter_woken_on_a_removed_lock_file_takes_the_new_one(tmp_path: Path) -> None:
    target = tmp_path / "out"
    order: list[str] = []

    def second() -> None:
        with directory_lock(target):
            order.append("second")

    with directory_lock(target):
        order.append("first")
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(timeout=0.3)  # it blocks on the lock meanwhile
        assert order == ["first"] and waiter.is_alive()
    waiter.join(timeout=30)
    assert order == ["first", "second"]
    assert list(tmp_path.iterdir()) == []  # its own lock file removed as well


def test_atomic_write_and_link(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "sub" / "x.txt", "ü\n")
    assert (tmp_path / "sub" / "x.txt").read_bytes() == "ü\n".encode()
    with pytest.raises(ZeroDivisionError):
        atomic_write_text(tmp_path / "sub" / "x.txt", str(1 / 0))
    assert (tmp_path / "sub" / "x.txt").read_text() == "ü\n"
    atomic_link(tmp_path / "sub" / "x.txt", tmp_path / "sub" / "y.txt")
    assert os.path.samefile(tmp_path / "sub" / "x.txt", tmp_path / "sub" / "y.txt")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.txt", "y.txt"]


def sample() -> RunResults:
    best = CheckpointResult(
        step=120,
        beam_size=5,
        alpha=1.4,
        valid=Score(38.1, 63.0, "nrefs:1|bleu"),
        test={"test_2016_flickr": Score(37.0, 62.5, "nrefs:1|bleu")},
        alpha_grid={"0.6": 37.5, "1.4": 38.1},
    )
    averaged = CheckpointResult(step=150, beam_size=5, alpha=3.0, valid=Score(38.9, 63.4, "s"))
    return RunResults(
        steps=150,
        epochs=3,
        train_minutes=1.5,
        best_val_bleu_greedy=36.2,
        final="averaged.pt",
        checkpoints={"best.pt": best, "averaged.pt": averaged},
    )


def test_results_round_trip_and_answer_which_alpha_a_checkpoint_got(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("best.pt", "averaged.pt"):
        (ckpts / name).write_text(name)
    os.link(ckpts / "averaged.pt", ckpts / "final.pt")
    results = sample()
    assert results.write(tmp_path) == tmp_path / "results.json"
    read = RunResults.read(tmp_path)
    assert read == results
    assert read.final_result is read.checkpoints["averaged.pt"]
    assert read.alpha_for(ckpts / "final.pt", 150, 5) == 3.0  # final.pt is averaged.pt
    assert read.alpha_for(ckpts / "best.pt", 120, 5) == 1.4
    assert read.alpha_for(ckpts / "best.pt", 150, 5) is None  # another step
    assert read.alpha_for(ckpts / "best.pt", 120, 4) is None  # another beam size


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"steps": 1}',
        json.dumps({**json.loads(json.dumps(sample().__dict__, default=vars)), "steps": "x"}),
    ],
)
def test_a_malformed_results_file_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ResultsError, match=str(tmp_path / "results.json")):
        RunResults.read(tmp_path)
    with pytest.raises(ResultsError, match="cannot read"):
        RunResults.read(tmp_path / "missing")
