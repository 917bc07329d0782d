"""Data-parallel training (2 CPU processes, gloo), Hydra sweeps through submitit, SLURM config."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import WORDS, run_cli, small_transformer, synthetic_corpus, synthetic_overrides
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


def _sharded_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of test_sharded_translation_and_replica_checks (run in a spawned process)."""
    import torch.distributed as torch_dist

    from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
    from transformer_mt.decoding import SearchOptions, Translator
    from transformer_mt.training import distributed as dist

    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    ctx = dist.DistContext(rank=rank, world_size=2)
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(300)]
    tokenizer = Tokenizer(train_sentencepiece(text, 80, "unigram", 1.0))
    model = small_transformer(vocab_size=tokenizer.vocab_size, max_positions=24)
    sharded = dist.ShardedTranslator(Translator(model, tokenizer, torch.device("cpu")), ctx)
    lines = text[:23]  # not a multiple of the ranks
    out = {
        "beam": sharded.translate(lines, SearchOptions(beam_size=3)),
        "greedy": sharded.translate(lines, SearchOptions(beam_size=1)),
        "nbest": sharded.translate(lines, SearchOptions(beam_size=3, nbest=2)),
        "checksum": dist.check_replicas_in_sync(model, ctx),
    }
    if rank == 1:  # one bit of one parameter differs on rank 1
        with torch.no_grad():
            flat = model.output_projection.weight.view(-1)
            flat[7] = torch.nextafter(flat[7], torch.tensor(1.0))
    try:
        dist.check_replicas_in_sync(model, ctx)
        out["diverged"] = "not detected"
    except RuntimeError as e:
        out["diverged"] = str(e)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_sharded_translation_and_replica_checks(tmp_path: Path) -> None:
    """Each of 2 ranks decodes half of the sentences, and both get every translation, in
    order, equal to one process's; replicas equal in every bit pass the checksum, one bit
    apart fail it."""
    torch.multiprocessing.start_processes(
        _sharded_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
    from transformer_mt.decoding import SearchOptions, Translator

    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(300)]
    tokenizer = Tokenizer(train_sentencepiece(text, 80, "unigram", 1.0))
    model = small_transformer(vocab_size=tokenizer.vocab_size, max_positions=24)
    one = Translator(model, tokenizer, torch.device("cpu"))
    lines = text[:23]
    expected = {
        "beam": one.translate(lines, SearchOptions(beam_size=3)),
        "greedy": one.translate(lines, SearchOptions(beam_size=1)),
        "nbest": one.translate(lines, SearchOptions(beam_size=3, nbest=2)),
    }
    for out in ranks:
        for key, value in expected.items():
            assert out[key] == value, key
        assert "replicas diverged" in out["diverged"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert len(ranks[0]["checksum"]) == 32


def test_the_replica_checksum_sees_one_bit_and_does_not_depend_on_its_chunks() -> None:
    from transformer_mt.training import distributed as dist

    torch.manual_seed(0)
    model = small_transformer(vocab_size=40, max_positions=24)
    whole = dist.parameters_checksum(model, chunk=1 << 30)
    assert torch.equal(dist.parameters_checksum(model, chunk=7), whole)
    assert torch.equal(dist.parameters_checksum(model), whole)
    with torch.no_grad():  # one bit of one weight, in the middle of a chunk
        w = next(model.parameters()).view(-1)
        w[10:11].view(torch.int32).bitwise_xor_(1)
    assert not torch.equal(dist.parameters_checksum(model, chunk=7), whole)


def test_a_sharded_translator_keeps_the_translators_settings() -> None:
    from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
    from transformer_mt.decoding import SearchOptions, Translator
    from transformer_mt.training import distributed as dist

    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(300)]
    tokenizer = Tokenizer(train_sentencepiece(text, 80, "unigram", 1.0))
    model = small_transformer(vocab_size=tokenizer.vocab_size, max_positions=24)
    inner = Translator(model, tokenizer, torch.device("cpu"), step=3, precision="bf16")
    sharded = dist.ShardedTranslator(inner, dist.DistContext())
    assert (sharded.precision, sharded.step, sharded.use_cache) == ("bf16", 3, True)
    assert sharded.search_model is inner.search_model  # not a second bf16 copy
    options = SearchOptions(beam_size=3)
    assert sharded.translate(text[:9], options) == inner.translate(text[:9], options)
