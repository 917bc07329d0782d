"""The Trainer on a small synthetic corpus: determinism, stopping, checkpoints, config errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import random_en_de_checkpoint, synthetic_overrides
from transformer_mt.cli.common import config_dir
from transformer_mt.cli.train import record_failure, report
from transformer_mt.data.directions import read_references
from transformer_mt.decoding import SearchOptions, Translator
from transformer_mt.decoding.workers import PooledTranslator
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.formats.results import RunResults, tuned_alpha
from transformer_mt.model import Transformer
from transformer_mt.training import distributed as dist
from transformer_mt.training.averaging import average_checkpoints
from transformer_mt.training.config import validate_config
from transformer_mt.training.setup import build_training
from transformer_mt.training.trainer import Trainer


def make_config(root: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *synthetic_overrides(root),
                "trainer.log_every=5",
                "optim.warmup_steps=10",
                *overrides,
            ],
        )


def test_same_seed_gives_the_same_run(corpus_root: Path) -> None:
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = make_config(corpus_root, "trainer.max_steps=12", f"seed={seed}")
        trainer = Trainer(cfg, corpus_root / name)
        result = trainer.train()
        assert result.steps == 12
        return trainer.model.state_dict()

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_an_updates_token_count_comes_from_the_batch_plan_not_a_collective(
    corpus_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def collective(*args: object) -> float:  # a host sync per update under DDP
        raise AssertionError("the update summed its token count with a collective")

    monkeypatch.setattr(dist, "all_reduce_sum", collective)
    cfg = make_config(corpus_root, "trainer.max_steps=3", "trainer.update_freq=2")
    assert Trainer(cfg, corpus_root / "run").train().steps == 3


def test_stops_at_max_epochs_and_writes_usable_checkpoints(corpus_root: Path) -> None:
    cfg = make_config(
        corpus_root, "trainer.max_epochs=2", "trainer.max_steps=null", "trainer.log_every=1"
    )
    trainer = Trainer(cfg, corpus_root / "run")
    result = trainer.train()
    assert trainer.state.epoch == 2
    last = torch.load(corpus_root / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == result.steps
    assert set(last) >= {"model", "optimizer", "scheduler", "config", "spm_model", "val_bleu"}
    translator = Translator.from_checkpoint(result.best_checkpoint)
    out = translator.translate(["a dog runs", "", "the red ball"], SearchOptions(beam_size=2))
    assert len(out) == 3 and out[1] == ""
    events = EventAccumulator(str(corpus_root / "run" / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) >= {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/peak_memory_mib",
        "valid/bleu",
        "valid/loss",
    }
    examples = events.Tensors("valid/examples/text_summary")[-1].tensor_proto.string_val[0]
    assert b"**src** " in examples and b"**hyp** " in examples
    hparams = EventAccumulator(str(corpus_root / "run" / "tensorboard" / "hparams")).Reload()
    assert "hparam/best_val_bleu_greedy" in hparams.Tags()["scalars"]
    saved = RunResults.read(corpus_root / "run")
    assert saved.steps == result.steps and saved.best_val_bleu_greedy == result.best_val_bleu
    assert saved.final is None and result.final_checkpoint is None  # trainer.final_eval=false
    assert not (corpus_root / "run" / "checkpoints" / "final.pt").exists()


def test_average_last_writes_the_mean_of_the_last_checkpoints_and_scores_it(
    corpus_root: Path,
) -> None:
    cfg = make_config(
        corpus_root,
        "trainer.max_steps=12",
        "trainer.save_every_steps=4",
        "trainer.average_last=2",
        "trainer.final_eval=true",
        "trainer.final_beam_size=2",
        "trainer.final_alpha=0.5",
    )
    result = Trainer(cfg, corpus_root / "run").train()
    ckpts = corpus_root / "run" / "checkpoints"
    averaged = torch.load(ckpts / "averaged.pt", weights_only=True)
    a, b = (
        torch.load(ckpts / f"checkpoint_{s:07d}.pt", weights_only=True)["model"] for s in (8, 12)
    )
    for name, value in averaged["model"].items():
        torch.testing.assert_close(value, (a[name] + b[name]) / 2)
    assert not torch.equal(
        a["encoder.layers.0.feed_forward.linear1.weight"],
        b["encoder.layers.0.feed_forward.linear1.weight"],
    )
    saved = RunResults.read(corpus_root / "run")
    assert saved == result.results
    assert list(saved.checkpoints) == ["best.pt", "averaged.pt"]
    for r in saved.checkpoints.values():
        assert (r.beam_size, r.alpha, r.alpha_grid) == (2, 0.5, {})
        assert list(r.test) == ["test_2016_flickr"] and r.valid.signature.startswith("nrefs:1")
    # final.pt links the one with the higher val BLEU (the first of ties)
    val = {name: r.valid.bleu for name, r in saved.checkpoints.items()}
    assert saved.final == max(val, key=lambda name: val[name])
    assert result.final_checkpoint == ckpts / "final.pt"
    assert os.path.samefile(ckpts / "final.pt", ckpts / saved.final)
    # tmt-evaluate/tmt-translate find the α of each file in results.json (beam 2 only).
    best_step = torch.load(ckpts / "best.pt", weights_only=True)["step"]
    assert saved.checkpoints["best.pt"].step == best_step
    assert saved.checkpoints["averaged.pt"].step == averaged["step"]
    assert tuned_alpha(ckpts / "best.pt", best_step, beam_size=2) == 0.5
    assert tuned_alpha(ckpts / "averaged.pt", averaged["step"], beam_size=2) == 0.5
    final_step = saved.checkpoints[saved.final].step
    assert tuned_alpha(ckpts / "final.pt", final_step, beam_size=2) == 0.5
    assert tuned_alpha(ckpts / "best.pt", best_step, beam_size=5) is None
    printed = report(result)  # what tmt-train prints at the end
    assert f"final checkpoint: {ckpts / 'final.pt'} -> {saved.final} (chosen on val" in printed
    assert "best.pt: val BLEU" in printed and "averaged.pt: val BLEU" in printed
    assert "test_2016_flickr (beam 2, α 0.5): BLEU" in printed


class _Score:
    def __init__(self, value: float) -> None:
        self.score, self.signature = value, "length"


def length_score(hyps: list[str], refs: list[str], *metrics: object) -> dict[str, _Score]:
    """A stand-in for BLEU that rises with the output length (which α changes)."""
    return {"bleu": _Score(sum(map(len, hyps)) / len(hyps)), "chrf": _Score(0.0)}


def test_a_list_of_alphas_is_tuned_on_val_and_only_the_winner_decodes_test(
    corpus_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scored by output length, the α that writes the longest val output must win, and test
    # must be decoded at it; a real BLEU is ~0 for every α this early in training.
    scored: list[list[str]] = []  # every list of hypotheses the final evaluation scored

    def record(hyps: list[str], refs: list[str], *metrics: object) -> dict[str, _Score]:
        scored.append(hyps)
        return length_score(hyps, refs)

    monkeypatch.setattr("transformer_mt.evaluation.final.score", record)
    started = []  # the final evaluation decodes in worker processes (trainer.final_workers)
    start = PooledTranslator._start
    monkeypatch.setattr(PooledTranslator, "_start", lambda self: (started.append(1), start(self)))
    grid = [0.0, 0.5, 4.0]
    cfg = make_config(
        corpus_root,
        "trainer.max_steps=12",
        "trainer.average_last=null",
        "trainer.final_eval=true",
        "trainer.final_beam_size=4",
        f"trainer.final_alpha=[{','.join(map(str, grid))}]",
        "trainer.final_workers=2",  # decoded in two processes: as in one (checked below)
    )
    result = Trainer(cfg, corpus_root / "run").train()
    saved = RunResults.read(corpus_root / "run").checkpoints["best.pt"]
    val_score = saved.alpha_grid
    assert list(val_score) == ["0", "0.5", "4"]
    assert val_score["4"] > val_score["0"]  # the penalty lengthens the output
    chosen = max(grid, key=lambda a: val_score[f"{a:g}"])
    assert chosen != grid[0] and saved.alpha == chosen and saved.beam_size == 4
    assert saved.valid.bleu == val_score[f"{chosen:g}"]
    scores = {"valid": saved.valid.bleu, "test": saved.test["test_2016_flickr"].bleu}
    # the reported val and test scores are those of the chosen α, decoded again from best.pt
    translator = Translator.from_checkpoint(Path(result.best_checkpoint), device="cpu")
    for role in ("valid", "test"):
        _, src, refs = read_references(cfg.data, role)[0]
        hyps = translator.translate(src, SearchOptions(beam_size=4, alpha=chosen))
        assert length_score(hyps, refs)["bleu"].score == pytest.approx(scores[role])
        assert hyps in scored  # sentence by sentence, those of one process
    assert started


@pytest.mark.parametrize("average_last", [1, 6])
def test_average_last_below_2_or_above_keep_last_is_a_config_error(
    corpus_root: Path, average_last: int
) -> None:
    cfg = make_config(corpus_root, f"trainer.average_last={average_last}", "trainer.keep_last=5")
    with pytest.raises(ConfigError, match=r"trainer\.average_last"):
        Trainer(cfg, corpus_root / "run")


def test_bad_precision_fails_before_training(corpus_root: Path) -> None:
    cfg = make_config(corpus_root, "trainer.precision=fp8")
    with pytest.raises(ValueError, match=r"trainer\.precision"):
        Trainer(cfg, corpus_root / "run")
    assert not (corpus_root / "prepared").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=0", "optim.lr"),
        ("trainer.max_tokens=-5", "trainer.max_tokens"),
        ("trainer.final_alpha=-1", "trainer.final_alpha"),
        ("trainer.final_alpha=[1.0,-1]", "trainer.final_alpha"),
        ("trainer.final_alpha=inf", "trainer.final_alpha"),
        ("trainer.final_alpha=[1.0,nan]", "trainer.final_alpha"),
        ("trainer.final_alpha=[]", "trainer.final_alpha"),
        ("trainer.final_alpha=abc", "trainer.final_alpha"),
        ("trainer.clip_norm=abc", "trainer.clip_norm"),
        ("optim.lr=fast", "optim.lr"),
        ("trainer.max_steps=true", "trainer.max_steps"),
        ("trainer.max_minutes=0", "trainer.max_minutes"),
        ("model.n_heads=3", "model.n_heads"),
        ("data.filter.max_len=300", "model.max_positions"),
        ("data.tgt_lang=en", "data.src_lang"),
        ("trainer.average_last=2.5", "trainer.average_last"),  # a fraction for a count
        ("trainer.keep_best=1.5", "trainer.keep_best"),
        ("trainer.final_beam_size=2.5", "trainer.final_beam_size"),
        ("trainer.final_workers=0", "trainer.final_workers"),
        ("trainer.final_workers=1.5", "trainer.final_workers"),
        ("trainer.valid_max_sentences=-1", "trainer.valid_max_sentences"),
        ("seed=1.5", "seed"),
        ("seed=null", "seed"),
        ("seed=-1", "seed"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("optim.eps=0", "optim.eps"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.decay_steps=0", "optim.decay_steps"),  # before the warmup's end
        ("optim.decay_steps=2.5", "optim.decay_steps"),
        ("optim.decay_steps=100", "optim.decay_steps"),  # inverse_sqrt would ignore it
        ("optim.min_lr=abc", "optim.min_lr"),
    ],
)
def test_bad_values_fail_before_any_work_naming_the_key(
    corpus_root: Path, override: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Trainer(make_config(corpus_root, override), corpus_root / "run")
    assert not (corpus_root / "prepared").exists()


def test_final_workers_are_for_one_process_on_a_cpu(
    corpus_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(corpus_root, "trainer.final_workers=2")
    validate_config(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"trainer\.final_workers=2 is for CPUs"):
        validate_config(cfg, torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"trainer\.final_workers=2 is for one process"):
        validate_config(cfg, torch.device("cpu"), world_size=2)

    def join(ctx: dist.DistContext, device: torch.device) -> None:
        raise AssertionError("joined the job before checking the config")

    two_ranks = dist.DistContext(rank=0, world_size=2, local_rank=0)
    monkeypatch.setattr(dist, "job_context", lambda: two_ranks)
    monkeypatch.setattr(dist, "init_distributed", join)
    with pytest.raises(ConfigError, match=r"trainer\.final_workers=2 is for one process"):
        build_training(cfg)
    assert not (corpus_root / "prepared").exists()


def test_every_shipped_recipe_composes_and_passes_the_config_checks() -> None:
    recipes = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
    assert recipes  # at least multi30k_best
    with initialize_config_dir(config_dir(), version_base="1.3"):
        default = compose("train")
        for recipe in recipes:
            cfg = compose("train", overrides=[f"experiment={recipe}"])
            validate_config(cfg, torch.device("cpu"))
            assert cfg != default
        best = compose("train", overrides=["experiment=multi30k_best"])
    # multi30k_best keeps the default model but for its dropout, and trains for 122 minutes
    assert (default.model.dropout, best.model.dropout) == (0.2, 0.3)
    assert {k: v for k, v in best.model.items() if k != "dropout"} == {
        k: v for k, v in default.model.items() if k != "dropout"
    }
    assert (best.optim.lr, best.optim.warmup_steps) == (5e-3, 2000)
    assert best.trainer.max_minutes == 122 and default.trainer.max_minutes is None


def test_the_factory_takes_a_model_of_the_tests_own(corpus_root: Path) -> None:
    cfg = make_config(corpus_root, "trainer.max_steps=3")
    probe = build_training(cfg)
    tok = probe.tokenizer
    model = Transformer(
        vocab_size=tok.vocab_size, pad_id=tok.pad_id, d_model=16, n_heads=2,
        n_encoder_layers=1, n_decoder_layers=1, d_ff=32, max_positions=256,
    )  # fmt: skip
    setup = build_training(cfg, model=model)
    assert setup.model is model and setup.update.model is model
    assert setup.update.optimizer.param_groups[0]["params"][0] is next(model.parameters())
    trainer = Trainer(cfg, corpus_root / "run", setup=setup)
    before = next(model.parameters()).detach().clone()
    assert trainer.train().steps == 3
    assert not torch.equal(before, next(model.parameters()))
    saved = torch.load(corpus_root / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["model"]["encoder.layers.0.feed_forward.linear1.weight"].shape == (32, 16)


def test_a_failed_sweep_job_keeps_a_finished_runs_results(tmp_path: Path) -> None:
    finished = RunResults(steps=7, epochs=1, final="averaged.pt")
    finished.write(tmp_path / "done")
    record_failure(tmp_path / "done", "trainer.init_from=x.pt: no such checkpoint file")
    assert RunResults.read(tmp_path / "done") == finished  # its scores and tuned α stay
    stopped = RunResults(steps=5, epochs=1, best_val_bleu_greedy=3.5)  # final_eval=false
    stopped.write(tmp_path / "no_eval")
    record_failure(tmp_path / "no_eval", "data.valid=x: no such file")
    assert RunResults.read(tmp_path / "no_eval") == stopped
    (tmp_path / "new").mkdir()
    record_failure(tmp_path / "new", "optim.lr must be positive, got 0")
    assert (
        RunResults.read(tmp_path / "new").stop_reason == "failed: optim.lr must be positive, got 0"
    )


def test_averaging_refuses_the_same_weights_twice(tmp_path: Path) -> None:
    first = random_en_de_checkpoint(tmp_path / "checkpoint_100.pt")
    os.link(first, tmp_path / "last.pt")  # a hard link, as the trainer writes it
    shutil.copyfile(first, tmp_path / "best.pt")  # a copy, where hard links are not supported
    for twin in ("last.pt", "best.pt"):
        with pytest.raises(
            CheckpointError, match=rf"{twin} holds the same weights as .*checkpoint_100\.pt"
        ):
            average_checkpoints([first, tmp_path / twin])
    other = tmp_path / "checkpoint_200.pt"
    state = torch.load(first, weights_only=True)
    state["model"]["decoder.final_norm.weight"] += 1.0  # another step: other weights
    torch.save(state, other)
    averaged = average_checkpoints([first, other])["model"]["decoder.final_norm.weight"]
    torch.testing.assert_close(averaged, state["model"]["decoder.final_norm.weight"] - 0.5)
