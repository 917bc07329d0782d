"""The training state: the counters of a run, and the one place that saves and restores it
together with the weights, optimizer, schedule, scaler and RNGs.

A checkpoint written during training holds, besides the file format's keys (see
:mod:`transformer_mt.formats.checkpoint`), ``optimizer``, ``scheduler``, ``scaler`` (fp16),
``rng`` (one state per rank) and ``trainer`` (:class:`TrainState` without step and epoch,
which are top-level keys of every checkpoint).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from transformer_mt.data.prepare import NOT_CONTENT
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.formats.checkpoint import spm_bytes_to_tensor
from transformer_mt.model import with_defaults
from transformer_mt.training import distributed as dist
from transformer_mt.training.rng import rng_state, set_rng_state
from transformer_mt.training.step import UpdateStep

PRE_SCHEDULE_OPTIM: dict[str, Any] = {
    "schedule": "inverse_sqrt",
    "decay_steps": None,
    "min_lr": 0.0,
}


@dataclass
class TrainState:
    """Where a run stands. Everything here is saved in its checkpoints."""

    step: int = 0  # applied updates
    epoch: int = 0  # completed epochs
    batches_done: int = 0  # batches of epoch ``epoch + 1`` already consumed
    best_val_bleu: float = -1.0
    best_step: int = -1
    bad_validations: int = 0  # validations since the best one (early stopping)
    nonfinite_total: int = 0  # skipped updates
    stop_reason: str = ""  # early stopping's message once it triggers
    validated_step: int = -1  # the step and val BLEU of the latest validation
    validated_bleu: float = 0.0
    train_seconds: float = 0.0  # training time of the run's earlier launches
    checkpoint_scores: dict[str, float] = field(default_factory=dict)  # file name -> val BLEU

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``trainer`` section (step and epoch are top-level keys)."""
        d = asdict(self)
        del d["step"], d["epoch"]
        return d

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> TrainState:
        """The counters of a training checkpoint (keys missing in older files keep their
        defaults)."""
        saved = state["trainer"]
        values: dict[str, Any] = {"step": int(state["step"]), "epoch": int(state["epoch"])}
        for f in fields(cls):
            if f.name in saved:
                default = getattr(cls(), f.name)
                values[f.name] = type(default)(saved[f.name])
        values["checkpoint_scores"] = {
            str(k): float(v) for k, v in values.get("checkpoint_scores", {}).items()
        }
        return cls(**values)


def training_checkpoint(
    update: UpdateStep,
    state: TrainState,
    config: dict[str, Any],
    spm_model: bytes,
    val_bleu: float | None,
) -> dict[str, Any]:
    """Everything needed to translate with the run and to continue it identically (a
    collective when distributed: the RNG states of all ranks are gathered)."""
    rngs = dist.all_gather_object(rng_state(), update.dist)
    checkpoint = {
        "model": update.model.state_dict(),
        "optimizer": update.optimizer.state_dict(),
        "scheduler": update.scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "val_bleu": val_bleu,
        "config": config,
        "spm_model": spm_bytes_to_tensor(spm_model),
        "rng": rngs,
        "trainer": state.to_dict(),
    }
    if update.scaler is not None:
        checkpoint["scaler"] = update.scaler.state_dict()
    return checkpoint


def restore_training(
    update: UpdateStep, path: Path, checkpoint: dict[str, Any], config: dict[str, Any]
) -> TrainState:
    """Load weights, optimizer, schedule, scaler and this rank's RNGs from a training
    checkpoint into ``update``; returns its counters. The ``model`` and ``data`` sections of
    its config must equal ``config``'s, and so must ``seed`` and ``trainer.max_tokens`` when
    it stopped inside an epoch (they make the epoch's batches). The ``optim`` section of
    ``config`` applies from here on, the changed keys printed."""
    if "trainer" not in checkpoint or "optimizer" not in checkpoint:
        raise CheckpointError(f"{path} holds no training state (an averaged checkpoint?)")
    saved = checkpoint["config"]
    for section in ("model", "data"):
        if _content(saved, section) != _content(config, section):
            key = _first_difference(_content(saved, section), _content(config, section), section)
            raise ConfigError(
                f"cannot resume from {path}: its {section} config differs from this "
                f"run's at {key} ({section}.* must match; trainer.resume=never starts afresh)"
            )
    state = TrainState.from_checkpoint(checkpoint)
    if state.batches_done:
        for key, was, now in (
            ("seed", saved.get("seed"), config.get("seed")),
            (
                "trainer.max_tokens",
                saved["trainer"].get("max_tokens"),
                config["trainer"]["max_tokens"],
            ),
        ):
            if was != now:
                raise ConfigError(
                    f"cannot resume from {path}: {key}={now}, but the run stopped "
                    f"{state.batches_done} batches into epoch {state.epoch + 1} with {key}={was}, "
                    "which made that epoch's batches; resume with the old value (a new value "
                    "can apply from an epoch's start)"
                )
    update.model.load_state_dict(checkpoint["model"])
    optimizer = update.optimizer
    kernel = {k: optimizer.defaults[k] for k in ("foreach", "fused")}
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:  # the saved flags would override ours
        group.update(kernel)
    update.scheduler.load_state_dict(checkpoint["scheduler"])
    # checkpoints from before optim.schedule ran the one schedule there was then
    saved_optim = {**PRE_SCHEDULE_OPTIM, **saved.get("optim", {})}
    changed = _changes(saved_optim, config["optim"], "optim")
    if changed:
        apply_optim(update, saved_optim, config["optim"])
        if update.dist.is_main:
            print(
                f"resuming with a changed optimizer config, applied from step {state.step + 1}: "
                + ", ".join(changed),
                flush=True,
            )
    if update.scaler is not None and "scaler" in checkpoint:
        update.scaler.load_state_dict(checkpoint["scaler"])
    rngs, ctx = checkpoint["rng"], update.dist
    if len(rngs) == ctx.world_size:
        set_rng_state(rngs[ctx.rank])
    else:
        print(
            f"warning: {path} was written by {len(rngs)} process(es), this job has "
            f"{ctx.world_size}; dropout streams are reseeded",
            file=sys.stderr,
        )
    return state


def apply_optim(update: UpdateStep, was: dict[str, Any], optim: dict[str, Any]) -> None:
    """Set the peak lr, betas, eps and weight decay of ``optim`` on a restored optimizer and
    schedule (its moments and step count stay), and the lr of the schedule's current step.
    ``was`` is the checkpoint's ``optim``: each parameter group's peak lr is scaled by the
    ratio of the two, and a group's weight decay changes only where it had ``was``'s."""
    scheduler = update.scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ConfigError(f"cannot change optim.* on resume with a {type(scheduler).__name__}")
    groups = update.optimizer.param_groups
    ratio = float(optim["lr"]) / float(was.get("lr", optim["lr"]))
    scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
    for group, lr_lambda, base in zip(
        groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True
    ):
        group.update(betas=tuple(optim["betas"]), eps=optim["eps"])
        if group["weight_decay"] == was.get("weight_decay"):
            group["weight_decay"] = optim["weight_decay"]
        group["initial_lr"] = base
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def _changes(was: dict[str, Any], now: dict[str, Any], prefix: str) -> list[str]:
    """``prefix.key old -> new`` for each key whose value differs between two config sections."""
    return [
        f"{prefix}.{key} {was.get(key)} -> {now.get(key)}"
        for key in sorted(set(was) | set(now))
        if was.get(key) != now.get(key)
    ]


def _first_difference(was: Any, now: Any, prefix: str) -> str:
    """The first dotted key at which two config sections differ, with both values."""
    if isinstance(was, dict) and isinstance(now, dict):
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                return _first_difference(was.get(key), now.get(key), f"{prefix}.{key}")
    return f"{prefix}: {was!r} there, {now!r} here"


def _content(config: dict[str, Any], section: str) -> dict[str, Any]:
    """A config section without the settings that do not change results, and with keys that
    older checkpoints lack at their defaults: every model argument, ``data.pairs=[]`` and
    ``data.tokenizer.from_checkpoint=false``."""
    if section == "model":
        return with_defaults(config["model"])
    out = {k: v for k, v in config[section].items() if k not in NOT_CONTENT}
    if not out.get("pairs"):
        out.pop("pairs", None)
    tokenizer = out.get("tokenizer")
    if isinstance(tokenizer, dict) and not tokenizer.get("from_checkpoint", False):
        out["tokenizer"] = {k: v for k, v in tokenizer.items() if k != "from_checkpoint"}
    return out


__all__ = ["TrainState", "restore_training", "training_checkpoint"]
