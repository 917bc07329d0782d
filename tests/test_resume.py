"""Exact resume after SIGKILL, corrupt-checkpoint fallback, keep-last/best, early stopping."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import BIN, synthetic_corpus, synthetic_overrides
from test_trainer import make_config
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.formats.checkpoint import (
    REQUIRED_KEYS,
    checkpoint_step,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
)
from transformer_mt.training.run_dir import CheckpointManager
from transformer_mt.training.schedule import inverse_sqrt_factor
from transformer_mt.training.step import StepResult
from transformer_mt.training.trainer import Trainer


@pytest.fixture
def corpus_root(tmp_path: Path) -> Path:
    synthetic_corpus(tmp_path / "raw", n_train=300)
    return tmp_path


def train_command(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """tmt-train on the synthetic corpus with the tiny model (dropout on: RNG state matters)."""
    return [
        str(BIN / "tmt-train"),
        *synthetic_overrides(root),
        "trainer.max_steps=400",
        "trainer.max_epochs=100",
        "trainer.save_every_steps=25",
        "trainer.validate_every_steps=100",
        "trainer.num_threads=1",
        "optim.warmup_steps=20",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 400
    return state["model"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_bitwise_identical_weights(corpus_root: Path) -> None:
    uninterrupted = subprocess.run(
        train_command(corpus_root, corpus_root / "a"), capture_output=True, text=True, timeout=600
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    command = train_command(corpus_root, corpus_root / "b")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = corpus_root / "b" / "checkpoints"
    deadline = time.monotonic() + 300
    while len(step_checkpoints(ckpt_dir)) < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-epoch, maybe mid-write: no chance to clean up
    assert proc.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(step_checkpoints(ckpt_dir)[-1])["step"]
    assert 0 < killed_at < 400

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = final_weights(corpus_root / "a"), final_weights(corpus_root / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_checkpoint_is_named_and_resume_uses_the_previous_one(
    corpus_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = ("trainer.save_every_steps=5", "trainer.keep_last=3", "trainer.average_last=2")
    Trainer(make_config(corpus_root, "trainer.max_steps=15", *overrides), corpus_root / "r").train()
    files = step_checkpoints(corpus_root / "r" / "checkpoints")
    assert [p.name for p in files] == [f"checkpoint_{s:07d}.pt" for s in (5, 10, 15)]
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash mid-copy
    with pytest.raises(CheckpointError, match=newest.name):
        load_checkpoint(newest)

    trainer = Trainer(
        make_config(corpus_root, "trainer.max_steps=20", *overrides), corpus_root / "r"
    )
    assert trainer.state.step == 10
    err = capsys.readouterr().err
    assert newest.name in err and "skipping" in err
    assert newest.with_name(newest.name + ".corrupt").exists()  # kept, not deleted
    trainer.train()
    assert load_checkpoint(corpus_root / "r" / "checkpoints" / "last.pt")["step"] == 20


def test_the_manager_keeps_exactly_the_last_k_and_the_best_k_by_val_bleu(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=2)
    kept_after = {}
    best = -1.0
    for step, bleu in enumerate([10.0, 30.0, 20.0, 5.0, 25.0, 1.0], start=1):
        manager.record_score(step, bleu)
        manager.save({key: step for key in REQUIRED_KEYS}, is_best=bleu > best)
        best = max(best, bleu)
        kept_after[step] = [checkpoint_step(p) for p in step_checkpoints(tmp_path)]
    assert kept_after[4] == [2, 3, 4]  # last two (3, 4) and best two (30 at 2, 20 at 3)
    assert kept_after[6] == [2, 5, 6]  # last two (5, 6) and best two (30 at 2, 25 at 5)
    assert manager.best_path.samefile(manager.path_for(2))  # links, as the trainer reads them
    assert manager.last_path.samefile(manager.path_for(6))


def test_keeps_the_last_k_and_the_best_k(corpus_root: Path) -> None:
    cfg = make_config(
        corpus_root,
        "trainer.max_steps=30",
        "trainer.save_every_steps=5",
        "trainer.validate_every_steps=5",
        "trainer.keep_last=2",
        "trainer.keep_best=1",
        "trainer.average_last=null",
    )
    trainer = Trainer(cfg, corpus_root / "r")
    trainer.train()
    ckpt_dir = corpus_root / "r" / "checkpoints"
    kept = step_checkpoints(ckpt_dir)
    scores = {p.name: load_checkpoint(p)["val_bleu"] for p in kept}
    best = load_checkpoint(ckpt_dir / "best.pt")
    assert best["val_bleu"] == trainer.state.best_val_bleu == max(scores.values())
    assert [p.name for p in kept[-2:]] == ["checkpoint_0000025.pt", "checkpoint_0000030.pt"]
    assert len(kept) <= 3
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 30


def test_early_stopping_when_val_bleu_stops_improving(corpus_root: Path) -> None:
    # A learning rate too small to change the greedy output: BLEU stays flat.
    cfg = make_config(
        corpus_root,
        "optim.lr=1e-12",
        "trainer.max_steps=100",
        "trainer.validate_every_steps=3",
        "trainer.patience=2",
    )
    result = Trainer(cfg, corpus_root / "r").train()
    assert result.steps == 9  # validations at 3 (best), 6 and 9 (no gain twice)
    results = json.loads((corpus_root / "r" / "results.json").read_text())
    assert results["stop_reason"].startswith("early stopping")
    # Relaunching a stopped run does not train further.
    again = Trainer(cfg, corpus_root / "r")
    assert again.train().steps == 9
    # A larger patience goes on: validations at 12 and 15 bring it to 4 without a gain.
    longer = make_config(
        corpus_root,
        "optim.lr=1e-12",
        "trainer.max_steps=100",
        "trainer.validate_every_steps=3",
        "trainer.patience=4",
    )
    assert Trainer(longer, corpus_root / "r").train().steps == 15
    # A finished run continued elsewhere with nothing left to do still leaves a checkpoint
    # there to evaluate.
    last = corpus_root / "r" / "checkpoints" / "last.pt"
    cfg = make_config(
        corpus_root, "optim.lr=1e-12", "trainer.max_steps=15", f"trainer.resume={last}"
    )
    assert Trainer(cfg, corpus_root / "s").train().steps == 15
    assert load_checkpoint(corpus_root / "s" / "checkpoints" / "last.pt")["step"] == 15


def test_resume_settings_are_checked(corpus_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.resume=/no/such\.pt"):
        Trainer(make_config(corpus_root, "trainer.resume=/no/such.pt"), corpus_root / "r")
    Trainer(make_config(corpus_root, "trainer.max_steps=2"), corpus_root / "r").train()
    with pytest.raises(ConfigError, match=r"trainer\.resume=never"):
        Trainer(make_config(corpus_root, "trainer.resume=never"), corpus_root / "r")
    with pytest.raises(ConfigError, match="model config differs"):
        Trainer(make_config(corpus_root, "model.d_ff=64"), corpus_root / "r")
    # Where the files are and which test sets are scored do not change what was trained.
    moved = make_config(corpus_root, "data.test=[]", "data.num_workers=2")
    assert Trainer(moved, corpus_root / "r").state.step == 2
    # An explicit path continues that checkpoint in a new run directory.
    last = corpus_root / "r" / "checkpoints" / "last.pt"
    trainer = Trainer(make_config(corpus_root, f"trainer.resume={last}"), corpus_root / "s")
    assert trainer.state.step == 2


def test_a_resumed_run_takes_this_launchs_optimizer_settings(corpus_root: Path) -> None:
    Trainer(make_config(corpus_root, "trainer.max_steps=3"), corpus_root / "r").train()
    same = Trainer(make_config(corpus_root), corpus_root / "r")
    group = same.update.optimizer.param_groups[0]
    peak, betas = group["initial_lr"], group["betas"]
    cfg = make_config(
        corpus_root,
        f"optim.lr={peak / 4}",
        "optim.betas=[0.8,0.9]",
        "optim.eps=1e-6",
        "optim.weight_decay=0.01",
    )
    changed = Trainer(cfg, corpus_root / "r")  # the same run directory: resumed
    assert changed.state.step == 3
    group = changed.update.optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.9), 1e-6) != (betas, 1e-9)
    assert group["weight_decay"] == 0.01
    assert group["lr"] == pytest.approx(same.update.optimizer.param_groups[0]["lr"] / 4)
    assert changed.update.scheduler.get_last_lr() == [group["lr"]]
    changed.update.scheduler.step()  # the schedule goes on from the new peak
    assert group["lr"] == pytest.approx(peak / 4 * inverse_sqrt_factor(5, 10))
    state = changed.update.optimizer.state_dict()["state"]
    assert state and all(int(s["step"]) == 3 for s in state.values())  # moments kept


def test_cosine_schedule_reaches_min_lr_and_a_resume_can_switch_to_it(
    corpus_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cosine = ("optim.schedule=cosine", "optim.decay_steps=14", "optim.min_lr=1e-5")
    done = Trainer(make_config(corpus_root, "trainer.max_steps=14", *cosine), corpus_root / "c")
    done.train()
    assert done.update.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # the floor
    # A checkpoint written before optim.schedule existed resumes as the same schedule, quietly.
    Trainer(make_config(corpus_root, "trainer.max_steps=3"), corpus_root / "r").train()
    last = corpus_root / "r" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    for key in ("schedule", "decay_steps", "min_lr"):
        del state["config"]["optim"][key]
    save_checkpoint(last, state)
    capsys.readouterr()
    same = Trainer(make_config(corpus_root), corpus_root / "r")
    assert same.state.step == 3 and "changed optimizer" not in capsys.readouterr().out
    peak = same.update.optimizer.param_groups[0]["initial_lr"]
    assert same.update.optimizer.param_groups[0]["lr"] == pytest.approx(
        peak * inverse_sqrt_factor(4, 10)
    )
    # Resuming it with the cosine schedule applies that schedule from the step it reached.
    switched = Trainer(make_config(corpus_root, *cosine), corpus_root / "r")
    out = capsys.readouterr().out
    assert "optim.schedule inverse_sqrt -> cosine" in out and switched.state.step == 3
    assert switched.update.optimizer.param_groups[0]["lr"] == pytest.approx(peak * 4 / 10)
    switched.update.optimizer.step()
    for _ in range(11):  # to update 15: past decay_steps, at the floor
        switched.update.scheduler.step()
    assert switched.update.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_cosine_schedule_ends_at_the_runs_last_planned_update_by_default(
    corpus_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cosine = ("optim.schedule=cosine", "optim.min_lr=1e-5", "trainer.max_steps=null")
    epochs = ("trainer.max_epochs=2", "trainer.update_freq=2")  # a short last update per epoch
    trainer = Trainer(make_config(corpus_root, *cosine, *epochs), corpus_root / "c")
    planned = trainer.setup.config["optim"]["decay_steps"]
    lrs: list[float] = []  # the lr of each update
    train_step = trainer.train_step

    def recording_step(*args: Any) -> StepResult:
        lrs.append(trainer.update.optimizer.param_groups[0]["lr"])
        return train_step(*args)

    trainer.train_step = recording_step  # type: ignore[method-assign]
    assert f"cosine from 0.003 down to 1e-05 at update {planned}" in capsys.readouterr().out
    trainer.train()
    assert trainer.state.epoch == 2 and trainer.state.step == planned > 10  # past the warmup
    # After the warmup the lr falls at every update; the last planned one runs at min_lr.
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-2] > 1e-5 and lrs[-1] == pytest.approx(1e-5)
    saved = load_checkpoint(corpus_root / "c" / "checkpoints" / "last.pt")
    assert saved["config"]["optim"]["decay_steps"] == planned  # the run's record says it
    # Resumed with the same settings it resolves to the same update, so nothing changes.
    capsys.readouterr()
    again = Trainer(make_config(corpus_root, *cosine, *epochs), corpus_root / "c")
    assert again.setup.config["optim"]["decay_steps"] == planned
    assert "optim.decay_steps" not in capsys.readouterr().out
    # trainer.max_steps, when it comes first, is the last planned update.
    short = make_config(corpus_root, *cosine, "trainer.max_steps=13")
    assert Trainer(short, corpus_root / "s").setup.config["optim"]["decay_steps"] == 13
    # A plan that ends inside the warmup cannot decay: the error names the keys.
    with pytest.raises(ConfigError, match=r"optim\.decay_steps=null.*trainer\.max_steps=8"):
        Trainer(make_config(corpus_root, *cosine, "trainer.max_steps=8"), corpus_root / "e")


def test_mid_epoch_resume_refuses_another_batch_plan(corpus_root: Path) -> None:
    Trainer(make_config(corpus_root, "trainer.max_steps=3"), corpus_root / "r").train()
    last = corpus_root / "r" / "checkpoints" / "last.pt"
    for override, key in (("seed=2", "seed"), ("trainer.max_tokens=512", r"trainer\.max_tokens")):
        cfg = make_config(corpus_root, override, f"trainer.resume={last}")
        with pytest.raises(ConfigError, match=rf"{key}=.*3 batches into epoch 1"):
            Trainer(cfg, corpus_root / "s")
    # At an epoch's end they only make the next epochs' batches: accepted.
    ended = make_config(corpus_root, "trainer.max_steps=null", "trainer.max_epochs=1")
    Trainer(ended, corpus_root / "e").train()
    at_end = corpus_root / "e" / "checkpoints" / "last.pt"
    for override in ("seed=2", "trainer.max_tokens=512"):
        cfg = make_config(corpus_root, override, f"trainer.resume={at_end}")
        assert Trainer(cfg, corpus_root / f"t{override}").state.epoch == 1
    with pytest.raises(ConfigError, match=r"model config differs from this run's at model\.d_ff"):
        Trainer(
            make_config(corpus_root, "model.d_ff=64", f"trainer.resume={last}"), corpus_root / "s"
        )


def test_resuming_with_another_update_freq_finishes_the_epoch(corpus_root: Path) -> None:
    first = Trainer(make_config(corpus_root, "trainer.max_steps=3"), corpus_root / "r")
    first.train()
    n_batches = len(first.epoch_batches(1))
    assert first.state.batches_done == 3 < n_batches
    cfg = make_config(
        corpus_root, "trainer.max_steps=null", "trainer.max_epochs=1", "trainer.update_freq=2"
    )
    second = Trainer(cfg, corpus_root / "r")
    assert second.state.step == 3
    result = second.train()
    assert second.state.epoch == 1 and second.state.batches_done == 0
    assert result.steps == 3 + -(-(n_batches - 3) // 2)  # the rest, two batches an update


def test_time_budget_stops_mid_epoch_and_counts_across_resumes(corpus_root: Path) -> None:
    def run(max_minutes: int) -> Trainer:
        cfg = make_config(
            corpus_root,
            "trainer.max_steps=null",
            "trainer.max_epochs=100",
            f"trainer.max_minutes={max_minutes}",
        )
        trainer = Trainer(cfg, corpus_root / "r")
        trainer.clock = lambda: (
            60.0 * trainer.state.step
        )  # a fake clock: each update takes a minute
        trainer.train()
        return trainer

    first = run(5)
    assert len(first.epoch_batches(1)) > 8  # so the budgets below end mid-epoch
    assert (first.state.step, first.state.epoch, first.state.batches_done) == (5, 0, 5)
    results = json.loads((corpus_root / "r" / "results.json").read_text())
    assert results["stop_reason"].startswith("time budget: trainer.max_minutes=5 spent")
    assert results["train_minutes"] == 5.0
    last = load_checkpoint(corpus_root / "r" / "checkpoints" / "last.pt")
    assert (last["step"], last["trainer"]["train_seconds"]) == (5, 300.0)
    assert last["val_bleu"] is not None  # validated where it stopped
    assert run(5).state.step == 5  # relaunched: the budget is spent, no further update
    second = run(8)  # a larger budget continues the same epoch for the 3 minutes left
    assert (second.state.step, second.state.epoch, second.state.batches_done) == (8, 0, 8)


def test_time_budget_spent_at_an_epoch_end(corpus_root: Path) -> None:
    n = len(Trainer(make_config(corpus_root), corpus_root / "probe").epoch_batches(1))

    def run(max_epochs: int) -> tuple[Trainer, dict]:
        cfg = make_config(
            corpus_root,
            "trainer.max_steps=null",
            f"trainer.max_epochs={max_epochs}",
            f"trainer.max_minutes={n}",
        )
        trainer = Trainer(cfg, corpus_root / f"r{max_epochs}")
        trainer.clock = lambda: 60.0 * trainer.state.step  # each update takes a minute
        trainer.train()
        return trainer, json.loads((corpus_root / f"r{max_epochs}" / "results.json").read_text())

    trainer, results = run(max_epochs=3)
    assert (trainer.state.step, trainer.state.epoch, trainer.state.batches_done) == (n, 1, 0)
    assert results["stop_reason"].endswith(f"at step {n}, after epoch 1")
    last = load_checkpoint(corpus_root / "r3" / "checkpoints" / "last.pt")
    assert (last["epoch"], last["trainer"]["train_seconds"]) == (1, 60.0 * n)
    trainer, results = run(max_epochs=1)  # the last epoch ends with the budget: no time stop
    assert trainer.state.epoch == 1 and results["stop_reason"] == ""
