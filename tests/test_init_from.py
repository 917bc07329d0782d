"""Fine-tuning with trainer.init_from: the weights of another run, fresh state, lineage, the
compatibility checks, the checkpoint's SentencePiece model, and resume winning."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli, synthetic_corpus, synthetic_overrides
from test_trainer import make_config
from transformer_mt.cli.common import config_dir
from transformer_mt.data.prepare import prepared_name
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.formats.checkpoint import load_checkpoint, save_checkpoint
from transformer_mt.training.schedule import inverse_sqrt_factor
from transformer_mt.training.state import TrainState
from transformer_mt.training.trainer import Trainer

SMALL = ("model.d_model=32", "model.d_ff=64", "trainer.average_last=null")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus root, the last.pt of a 6-update run on it): the checkpoint to start from."""
    root = tmp_path_factory.mktemp("init_from")
    synthetic_corpus(root / "raw", n_train=200)
    Trainer(make_config(root, *SMALL, "trainer.max_steps=6"), root / "source").train()
    return root, root / "source" / "checkpoints" / "last.pt"


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_starts_from_the_weights_with_fresh_state_and_records_its_source(
    source: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, ckpt = source
    saved = load_checkpoint(ckpt)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]
    overrides = (f"trainer.init_from={ckpt}", "model.dropout=0.3", "optim.lr=1e-3")
    trainer = Trainer(make_config(root, *SMALL, *overrides, "trainer.max_steps=3"), root / "ft")
    # before the first update: the source's weights, and nothing else of its run
    assert same_weights(trainer.model.state_dict(), saved["model"])
    assert trainer.state == TrainState()
    assert trainer.update.optimizer.state_dict()["state"] == {}  # no Adam moments
    assert trainer.update.scheduler.last_epoch == 0
    assert trainer.update.scheduler.get_last_lr()[0] == pytest.approx(
        1e-3 * inverse_sqrt_factor(1, 10)  # the first step of warmup (make_config: 10 steps)
    )
    out = capsys.readouterr().out
    assert f"trainer.init_from: weights from {ckpt.resolve()} (step 6, sha256 {sha})" in out

    assert trainer.train().steps == 3
    last = load_checkpoint(root / "ft" / "checkpoints" / "last.pt")
    assert (last["step"], last["scheduler"]["last_epoch"]) == (3, 3)
    assert not same_weights(last["model"], saved["model"])  # it trained
    assert last["config"]["trainer"]["init_from"] == str(ckpt)
    assert last["config"]["lineage"] == [
        {"checkpoint": str(ckpt.resolve()), "step": 6, "sha256": sha}
    ]
    assert last["config"]["model"]["dropout"] == 0.3  # the dropout rates may differ
    events = EventAccumulator(str(root / "ft" / "tensorboard")).Reload()
    text = events.Tensors("run/init_from/text_summary")[0].tensor_proto.string_val[0].decode()
    assert str(ckpt.resolve()) in text and sha in text

    # A fine-tuned run fine-tuned again lists both sources, newest first.
    again = Trainer(
        make_config(root, *SMALL, f"trainer.init_from={root / 'ft/checkpoints/last.pt'}"),
        root / "ft2",
    )
    assert [e["step"] for e in again.setup.config["lineage"]] == [3, 6]


def test_resuming_a_fine_tuned_run_continues_it(
    source: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, ckpt = source
    init = f"trainer.init_from={ckpt}"
    Trainer(make_config(root, *SMALL, init, "trainer.max_steps=2"), root / "r").train()
    own = load_checkpoint(root / "r" / "checkpoints" / "last.pt")
    capsys.readouterr()
    resumed = Trainer(make_config(root, *SMALL, init, "trainer.max_steps=4"), root / "r")
    assert resumed.state.step == 2
    assert same_weights(resumed.model.state_dict(), own["model"])  # not the source's
    assert resumed.update.scheduler.last_epoch == 2
    assert f"trainer.init_from={ckpt.resolve()} not applied again" in capsys.readouterr().out
    assert resumed.train().steps == 4
    last = load_checkpoint(root / "r" / "checkpoints" / "last.pt")
    assert last["config"]["lineage"] == own["config"]["lineage"]
    assert last["config"]["lineage"][0]["step"] == 6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d_model=16", r"model\.d_model=16 but .*last\.pt has 32"),
        ("model.n_decoder_layers=1", r"model\.n_decoder_layers=1 but .* has 2"),
        ("model.norm_first=false", r"model\.norm_first=False but .* has True"),
    ],
)
def test_another_architecture_is_refused_naming_the_key(
    source: tuple[Path, Path], override: str, message: str
) -> None:
    root, ckpt = source
    cfg = make_config(root, *SMALL, f"trainer.init_from={ckpt}", override)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, root / "bad")


def test_a_key_an_older_checkpoint_lacks_counts_as_its_default(
    source: tuple[Path, Path],
) -> None:
    root, ckpt = source
    old = load_checkpoint(ckpt)
    del old["config"]["model"]["activation"], old["config"]["model"]["tie_embeddings"]
    save_checkpoint(root / "old.pt", old)
    init = f"trainer.init_from={root / 'old.pt'}"
    trainer = Trainer(make_config(root, *SMALL, init), root / "old_ok")  # relu, tied: defaults
    assert same_weights(trainer.model.state_dict(), old["model"])
    with pytest.raises(ConfigError, match=r"model\.activation=gelu but .*old\.pt has relu"):
        Trainer(make_config(root, *SMALL, init, "model.activation=gelu"), root / "old_bad")


def test_another_sentencepiece_model_needs_from_checkpoint_which_reuses_the_checkpoints(
    source: tuple[Path, Path],
) -> None:
    root, ckpt = source
    init, other_vocab = f"trainer.init_from={ckpt}", "data.tokenizer.vocab_size=50"
    with pytest.raises(
        ConfigError,
        match=r"vocabulary: .*last\.pt has \d+ pieces, this run's .*"
        r"set data\.tokenizer\.from_checkpoint=true",
    ):
        Trainer(make_config(root, *SMALL, init, other_vocab), root / "vocab")

    reuse = (init, other_vocab, "data.tokenizer.from_checkpoint=true")
    trainer = Trainer(make_config(root, *SMALL, *reuse), root / "reuse")
    spm = load_checkpoint(ckpt)["spm_model"].numpy().tobytes()
    prepared = trainer.setup.data.directory
    assert (prepared / "spm.model").read_bytes() == spm
    assert same_weights(trainer.model.state_dict(), load_checkpoint(ckpt)["model"])
    # its own cache: neither the source's nor the one a trained vocab_size=50 model gets
    trained = make_config(root, *SMALL, other_vocab).data
    assert prepared.name not in (prepared_name(trained), prepared_name(make_config(root).data))
    assert prepared.name == prepared_name(trained, spm)
    # tmt-prepare with the same settings finds that cache
    done = run_cli("tmt-prepare", *synthetic_overrides(root), *reuse)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(prepared)


def test_bad_init_from_settings_are_named(source: tuple[Path, Path]) -> None:
    root, ckpt = source
    with pytest.raises(ConfigError, match=r"trainer\.init_from=/no/such\.pt: no such checkpoint"):
        Trainer(make_config(root, "trainer.init_from=/no/such.pt"), root / "x")
    truncated = root / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"trainer\.init_from: cannot read checkpoint"):
        Trainer(make_config(root, f"trainer.init_from={truncated}"), root / "x")
    state = torch.load(ckpt, weights_only=True)
    state["spm_model"] = torch.zeros(40, dtype=torch.uint8)  # not a SentencePiece model
    torch.save(state, root / "no_spm.pt")
    with pytest.raises(CheckpointError, match=r"init_from: .*no_spm\.pt: spm_model is not a Sen"):
        Trainer(make_config(root, f"trainer.init_from={root / 'no_spm.pt'}"), root / "x")
    with pytest.raises(ConfigError, match=r"trainer\.init_from=.* and trainer\.resume="):
        Trainer(
            make_config(root, f"trainer.init_from={ckpt}", f"trainer.resume={ckpt}"), root / "x"
        )
    with pytest.raises(
        ConfigError, match=r"data\.tokenizer\.from_checkpoint=true .*trainer\.init_from"
    ):
        Trainer(make_config(root, "data.tokenizer.from_checkpoint=true"), root / "x")
    assert not (root / "x").exists()


def test_every_data_config_has_the_key_and_old_caches_and_checkpoints_still_fit(
    source: tuple[Path, Path],
) -> None:
    root, ckpt = source
    presets = sorted(p.stem for p in (Path(config_dir()) / "data").glob("*.yaml"))
    with initialize_config_dir(config_dir(), version_base="1.3"):
        for preset in presets:
            data = compose("train", overrides=[f"data={preset}"]).data
            assert data.tokenizer.from_checkpoint is False, preset
    # the new key at its default names the prepared cache as before it existed
    cfg = make_config(root).data
    name = prepared_name(cfg)
    OmegaConf.set_struct(cfg, False)
    del cfg.tokenizer["from_checkpoint"]
    assert prepared_name(cfg) == name
    # a checkpoint written before the key existed resumes
    old = load_checkpoint(ckpt)
    del old["config"]["data"]["tokenizer"]["from_checkpoint"]
    save_checkpoint(root / "before.pt", old)
    resumed = Trainer(make_config(root, *SMALL, f"trainer.resume={root / 'before.pt'}"), root / "b")
    assert resumed.state.step == 6
