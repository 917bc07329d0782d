"""The training code path against fixed points: a run of the tiny model must give weights
bitwise equal to (a) those the code gave before the trainer was split into modules, on
the CPU kinds that expectation was recorded on, and (b) a plain training loop written here
from the building blocks (model, loss, Adam, schedule, batches), on any CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from conftest import synthetic_corpus
from test_trainer import make_config
from transformer_mt.data.batching import collate, token_batches
from transformer_mt.data.prepare import prepare_data
from transformer_mt.model import build_model
from transformer_mt.training.loss import OutputLayerLoss
from transformer_mt.training.rng import seed_everything
from transformer_mt.training.schedule import inverse_sqrt_schedule
from transformer_mt.training.trainer import Trainer, epoch_rng

STEPS = 40
# sha256 of the weights after STEPS updates (see weights_digest) with torch 2.13.0 and one
# thread, per CPU kind (see cpu_kind): the math libraries pick their kernels, and so their
# summation order, by vendor and model. The AMD record was computed with the code before the
# split (commit e747c30, Trainer in one file); the Intel one with the code of the commit that
# added it, whose weights equalled that record on the AMD host.
RECORDED = {
    "AuthenticAMD family 25 model 17, AVX512": (
        "dcc1d11d37839fa0f206fe7a59bf0e05e00a864a09bbf07c1e97a1126aa5b594"
    ),
    "GenuineIntel family 6 model 167, AVX512": (
        "39c56b7af08bfb10e613e42736ae870db3c6989c926ed124898522c4de78e8d7"
    ),
}
RECORDED_SPM = "f29560f5c5c34adf3464f11bb92b1eecd4a521dd12ecdcd459b85fc1ffe91d0e"


def config(root: Path) -> DictConfig:
    synthetic_corpus(root / "raw", n_train=200)
    return make_config(
        root,
        f"trainer.max_steps={STEPS}",
        "trainer.validate_every_steps=20",
        "trainer.num_threads=1",
        "trainer.average_last=null",
    )


def cpu_kind() -> str:
    """The CPU's vendor, family and model (Linux's /proc/cpuinfo) and torch's vector ISA."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor, family, model = (fields.get(k) for k in ("vendor_id", "cpu family", "model"))
    return f"{vendor} family {family} model {model}, {torch.backends.cpu.get_cpu_capability()}"


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def plain_loop(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The algorithm the trainer implements, without the trainer: seed, data, model, then
    Adam updates on token-budget batches with the loss normalised by target tokens."""
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    data = prepare_data(cfg.data)
    tok, split = data.tokenizer, data.split("train")
    model = build_model(dict(cfg.model), tok.vocab_size, tok.pad_id)
    o = cfg.optim
    optimizer = torch.optim.Adam(
        model.parameters(), o.lr, tuple(o.betas), o.eps, o.weight_decay, fused=True
    )
    schedule = inverse_sqrt_schedule(optimizer, o.warmup_steps)
    criterion = OutputLayerLoss(cfg.trainer.label_smoothing, tok.pad_id)
    step, epoch = 0, 0
    while step < STEPS:
        epoch += 1
        rng = epoch_rng(cfg.seed, epoch)
        for idx in token_batches(split.src_lengths, split.tgt_lengths, cfg.trainer.max_tokens, rng):
            b = collate(split, idx, tok.pad_id, tok.bos_id, tok.eos_id)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            hidden = model(b.src, b.tgt_in, b.tgt_positions, project=False)
            loss, _ = criterion(hidden, model.output_projection.weight, b.real_targets())
            (loss * (1.0 / b.n_tgt_tokens * 1.0)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.clip_norm)
            optimizer.step()
            schedule.step()
            step += 1
            if step == STEPS:
                break
    return model.state_dict()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Trainer, DictConfig]]:
    """The trainer's run of STEPS updates on one thread (shared by the tests below)."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("equivalence")
    cfg = config(root)
    trainer = Trainer(cfg, root / "run")
    assert trainer.train().steps == STEPS
    yield trainer, cfg
    torch.set_num_threads(threads)


def test_training_matches_the_plain_loop(trained: tuple[Trainer, DictConfig]) -> None:
    trainer, cfg = trained
    ours = trainer.model.state_dict()
    plain = plain_loop(cfg)
    assert ours.keys() == plain.keys()
    assert [k for k in ours if not torch.equal(ours[k], plain[k])] == []


def test_training_gives_the_weights_recorded_for_this_cpu_kind(
    trained: tuple[Trainer, DictConfig],
) -> None:
    trainer, _ = trained
    kind = cpu_kind()
    if kind not in RECORDED:
        pytest.skip(f"no weights recorded for {kind!r} (kinds: {', '.join(RECORDED)})")
    spm = hashlib.sha256(trainer.tokenizer.model_bytes).hexdigest()
    if spm != RECORDED_SPM:
        pytest.skip(f"SentencePiece trained another model here ({spm[:12]}), so other weights")
    assert weights_digest(trainer.model.state_dict()) == RECORDED[kind]
