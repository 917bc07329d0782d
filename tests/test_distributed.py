"""Data-parallel training (2 CPU processes, gloo), Hydra sweeps through submitit, SLURM config."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import run_cli, synthetic_corpus, synthetic_overrides
from transformer_mt.cli.common import config_dir
from transformer_mt.formats.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def corpus_root(tmp_path: Path) -> Path:
    synthetic_corpus(tmp_path / "raw", n_train=300)
    return tmp_path


def file_layout(run_dir: Path) -> Counter[str]:
    """How many files each folder of a run holds, by name (event files by folder only)."""
    return Counter(
        str(p.parent.relative_to(run_dir)) + ("/<events>" if "tfevents" in p.name else f"/{p.name}")
        for p in run_dir.rglob("*")
        if p.is_file()
    )


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(corpus_root: Path) -> None:
    common = [
        *synthetic_overrides(corpus_root),
        "model.dropout=0",
        "trainer.max_steps=16",
        "trainer.save_every_steps=8",
        "trainer.num_threads=1",
    ]
    single = run_cli(
        "tmt-train", *common, "trainer.update_freq=2", f"hydra.run.dir={corpus_root / 'one'}"
    )
    assert single.returncode == 0, single.stderr[-2000:]

    def torchrun(max_steps: int) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
        ]
        command += ["-m", "transformer_mt.cli.train", *common, f"trainer.max_steps={max_steps}"]
        command += [f"hydra.run.dir={corpus_root / 'ddp'}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    first = torchrun(8)  # stops half-way; the second launch resumes it, in DDP too
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(16)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert "step 16: parameters identical on all 2 ranks" in second.stdout

    a = load_checkpoint(corpus_root / "one" / "checkpoints" / "last.pt")
    b = load_checkpoint(corpus_root / "ddp" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 16
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert len(b["rng"]) == 2  # one generator state per rank

    # Only rank 0 wrote: the same files as the single-process run (plus the first launch's
    # two TensorBoard event files), no second copy of anything.
    one, ddp = file_layout(corpus_root / "one"), file_layout(corpus_root / "ddp")
    assert ddp - Counter({"tensorboard/<events>": 1, "tensorboard/hparams/<events>": 1}) == one


def test_multirun_through_the_submitit_local_launcher(corpus_root: Path) -> None:
    sweep = corpus_root / "sweep"
    result = run_cli(
        "tmt-train",
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        *synthetic_overrides(corpus_root),
        "trainer.max_steps=6",
        "trainer.num_threads=1",
        "optim.lr=1e-3,3e-3,-1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (sweep / "summary.tsv").read_text().splitlines()
    header, *table = (row.split("\t") for row in rows)
    assert header[:3] == ["run", "overrides", "best_val_bleu_greedy"]
    assert sorted((row[0], row[1]) for row in table) == [
        ("0", "optim.lr=0.001"),
        ("1", "optim.lr=0.003"),
        ("2", "optim.lr=-1"),
    ]
    steps, stopped = header.index("steps"), header.index("stopped")
    assert [row[steps] for row in table[:2]] == ["6", "6"]  # both good runs did 6 updates
    assert table[2][stopped].startswith("failed: optim.lr must be positive")  # and went on
    assert "sweep summary" in result.stdout


def test_slurm_launcher_config_composes() -> None:
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 1
