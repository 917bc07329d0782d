"""Gradient accumulation, non-finite updates, precision settings, and checkpoint averaging."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import run_cli
from test_trainer import make_config
from transformer_mt.data.batching import Batch, collate
from transformer_mt.decoding import Translator
from transformer_mt.errors import ConfigError, TrainingDivergedError
from transformer_mt.formats.checkpoint import load_checkpoint, step_checkpoints
from transformer_mt.training.loss import label_smoothed_nll_loss
from transformer_mt.training.precision import configure_matmul, resolve_precision
from transformer_mt.training.setup import TrainingSetup, build_training
from transformer_mt.training.step import Outcome
from transformer_mt.training.trainer import Trainer


def batch_of(setup: TrainingSetup, indices: range) -> Batch:
    tok = setup.tokenizer
    return collate(setup.train_split, np.array(indices), tok.pad_id, tok.bos_id, tok.eos_id)


def test_accumulating_two_halves_equals_one_big_batch(corpus_root: Path) -> None:
    # The update step alone, without a run directory.
    big = build_training(make_config(corpus_root, "model.dropout=0"))
    accumulated = build_training(make_config(corpus_root, "model.dropout=0"))
    before = {k: v.clone() for k, v in big.model.state_dict().items()}
    one = big.update([(batch_of(big, range(0, 24)), 1.0)])
    halves = [(batch_of(accumulated, range(0, 9)), 1.0), (batch_of(accumulated, range(9, 24)), 1.0)]
    two = accumulated.update(halves)

    assert one.outcome is two.outcome is Outcome.APPLIED
    assert one.tokens == two.tokens
    assert torch.allclose(one.loss, two.loss, rtol=1e-5)
    assert not all(torch.equal(v, before[k]) for k, v in big.model.state_dict().items())
    # The gradients (clipped, then used by Adam) are those of the one big batch.
    for (name, p), q in zip(
        big.model.named_parameters(), accumulated.model.parameters(), strict=True
    ):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_non_finite_updates_are_skipped_then_stop_the_run(
    corpus_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(corpus_root, "trainer.max_nonfinite_updates=3")
    trainer = Trainer(cfg, corpus_root / "r")
    batch = batch_of(trainer.setup, range(0, 8))
    assert trainer.train_step([(batch, 1.0)]).outcome is Outcome.APPLIED
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    lr = trainer.update.scheduler.get_last_lr()

    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda *a, **k: forward(*a, **k) * float("nan"))
    assert trainer.train_step([(batch, 1.0)]).outcome is Outcome.NONFINITE
    assert trainer.train_step([(batch, 1.0)]).outcome is Outcome.NONFINITE
    assert "non-finite" in capsys.readouterr().err
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], good[k]) for k in good)  # weights untouched
    assert (trainer.state.step, trainer.state.nonfinite_total) == (1, 2)
    assert trainer.update.scheduler.get_last_lr() == lr  # the schedule did not advance
    with pytest.raises(TrainingDivergedError, match="3 consecutive non-finite"):
        trainer.train_step([(batch, 1.0)])

    monkeypatch.setattr(trainer.model, "forward", forward)
    trainer.nonfinite_run = 0
    assert trainer.train_step([(batch, 1.0)]).outcome is Outcome.APPLIED  # resets the run


def test_precision_settings(corpus_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.precision=fp16 needs a CUDA device"):
        build_training(make_config(corpus_root, "trainer.precision=fp16"))
    with pytest.raises(ConfigError, match=r"trainer\.precision=tf32 needs a CUDA device"):
        build_training(make_config(corpus_root, "trainer.precision=tf32"))
    auto = build_training(make_config(corpus_root))  # the default: auto, fp32 on a CPU
    assert auto.cfg.trainer.precision == "auto" and auto.update.precision == "fp32"
    assert auto.update.scaler is None
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    setup = build_training(make_config(corpus_root, "trainer.precision=bf16"))
    loss = setup.update([(batch_of(setup, range(0, 8)), 1.0)]).loss
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in setup.model.parameters())  # autocast only


@pytest.mark.parametrize("bf16_gpu", [True, False], ids=["ampere", "older gpu"])
def test_matmul_precision_follows_the_resolved_precision(
    bf16_gpu: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: bf16_gpu)
    before = torch.get_float32_matmul_precision()
    try:
        configure_matmul("auto", torch.device("cuda"))  # sets flags only: no GPU needed
        # auto: bf16 with TF32 for the fp32 rest, or fp32 with IEEE matmuls
        assert torch.get_float32_matmul_precision() == ("high" if bf16_gpu else "highest")
        configure_matmul("fp32", torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "highest"
        configure_matmul("tf32", torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision("medium")
        configure_matmul("auto", torch.device("cpu"))  # a no-op on CPU
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_compiled_training_step_matches_eager(
    corpus_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo tracing + AOT autograd without inductor's C++ code generation, which takes
    # minutes on 2 cores: the graph capture of our model is what is tested here.
    captured = CompileCounterWithBackend("aot_eager")  # counts the graphs Dynamo captures
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=captured))

    def first_update(*overrides: str) -> dict[str, torch.Tensor]:
        setup = build_training(make_config(corpus_root, "model.dropout=0", *overrides))
        setup.update([(batch_of(setup, range(0, 16)), 1.0)])
        return {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.grad is not None}

    eager = first_update()
    assert captured.frame_count == 0
    compiled = first_update("trainer.compile=true")
    assert captured.frame_count >= 1  # the forward really ran through torch.compile
    assert eager.keys() == compiled.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.update_freq=0", "trainer.update_freq"),
        ("trainer.keep_last=0", "trainer.keep_last"),
        ("trainer.save_every_steps=-1", "trainer.save_every_steps"),
        ("trainer.patience=0", "trainer.patience"),
        ("data.tgt_lang=zz", "data.tgt_lang=zz"),
    ],
)
def test_more_bad_values_fail_before_any_work(corpus_root: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Trainer(make_config(corpus_root, override), corpus_root / "run")
    assert not (corpus_root / "prepared").exists()


def test_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    result = run_cli("tmt-train", "trainer.max_stepz=5", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode != 0
    assert "max_stepz" in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_average_of_two_checkpoints_is_their_mean_and_translates(corpus_root: Path) -> None:
    cfg = make_config(
        corpus_root, "trainer.max_steps=10", "trainer.save_every_steps=5", "trainer.max_tokens=64"
    )
    Trainer(cfg, corpus_root / "r").train()
    first, second = step_checkpoints(corpus_root / "r" / "checkpoints")
    out = corpus_root / "avg.pt"
    result = run_cli("tmt-average", str(corpus_root / "r"), "--last", "2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    a, b, avg = load_checkpoint(first), load_checkpoint(second), load_checkpoint(out)
    for k, v in avg["model"].items():
        torch.testing.assert_close(v, (a["model"][k] + b["model"][k]) / 2)
    assert "optimizer" not in avg and avg["averaged_from"] == [str(first), str(second)]
    out_lines = Translator.from_checkpoint(out).translate(["a dog runs", "the red ball"])
    assert len(out_lines) == 2

    again = run_cli("tmt-average", str(first), str(second), "-o", str(out))
    assert again.returncode == 1 and "--force" in again.stderr  # never overwrites silently
    too_many = run_cli("tmt-average", str(corpus_root / "r"), "--last", "5", "-o", "x.pt")
    assert too_many.returncode == 1 and "holds 2" in too_many.stderr


def test_train_step_loss_equals_the_loss_of_the_full_padded_logits(corpus_root: Path) -> None:
    # The step projects only the real target positions; the loss must be that of all of them.
    cfg = make_config(corpus_root, "model.dropout=0")
    setup = build_training(cfg)
    batch = batch_of(setup, range(0, 16))
    assert (batch.tgt_out == setup.tokenizer.pad_id).any()  # the batch has padding
    with torch.no_grad():
        full, _ = label_smoothed_nll_loss(
            setup.model(batch.src, batch.tgt_in),
            batch.tgt_out,
            cfg.trainer.label_smoothing,
            setup.tokenizer.pad_id,
        )
    result = setup.update([(batch, 1.0)])
    assert result.outcome is Outcome.APPLIED
    assert result.tokens == batch.n_tgt_tokens
    torch.testing.assert_close(result.loss, full, rtol=1e-5, atol=1e-4)


def test_resume_uses_the_fused_optimizer_whatever_the_checkpoint_says(corpus_root: Path) -> None:
    cfg = make_config(corpus_root, "trainer.max_steps=4")
    Trainer(cfg, corpus_root / "a").train()
    state = load_checkpoint(corpus_root / "a" / "checkpoints" / "last.pt")
    for group in state["optimizer"]["param_groups"]:  # as written before fused Adam
        group["fused"], group["foreach"] = None, True
    old = corpus_root / "old.pt"
    torch.save(state, old)
    resumed = Trainer(
        make_config(corpus_root, "trainer.max_steps=8", f"trainer.resume={old}"), corpus_root / "b"
    )
    assert resumed.state.step == 4
    groups = resumed.update.optimizer.param_groups
    assert all(g["fused"] is True and not g["foreach"] for g in groups)
