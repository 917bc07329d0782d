"""Builds what a training run needs from its config, one ``_setup_*`` step per object:
device and process group, data, model, optimizer, schedule, scaler and the update step.

Tests and benchmarks call :func:`build_training` with a model of their own, or use the
steps one by one; nothing here needs a run directory. With ``trainer.init_from`` the model
starts from that checkpoint's weights (:mod:`transformer_mt.training.init_from`); a resumed
run then overwrites them with its own (:class:`~transformer_mt.training.trainer.Trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from transformer_mt.data.batching import token_batches
from transformer_mt.data.dataset import EncodedSplit, PreparedData
from transformer_mt.data.prepare import prepare_data
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.device import resolve_device
from transformer_mt.errors import ConfigError
from transformer_mt.evaluation.final import EvalSet, eval_sets
from transformer_mt.model import Transformer, build_model
from transformer_mt.training import distributed as dist
from transformer_mt.training.config import validate_config
from transformer_mt.training.init_from import (
    InitSource,
    checkpoint_tokenizer,
    initialise_from,
    load_init_source,
)
from transformer_mt.training.loss import OutputLayerLoss
from transformer_mt.training.precision import configure_matmul, grad_scaler, resolve_precision
from transformer_mt.training.rng import seed_everything
from transformer_mt.training.schedule import lr_schedule, planned_updates
from transformer_mt.training.step import UpdateStep


@dataclass
class TrainingSetup:
    """The objects of one run: its config, data, model and update rule."""

    cfg: DictConfig
    config: dict[str, Any]  # the resolved config as plain containers (saved in checkpoints)
    dist: dist.DistContext
    device: torch.device
    data: PreparedData
    train_split: EncodedSplit
    valid_split: EncodedSplit
    valid: list[EvalSet]  # raw val sentences for BLEU (the first trainer.valid_max_sentences),
    # one set, or one per direction of a multilingual model
    model: Transformer
    update: UpdateStep
    init_source: InitSource | None = None  # trainer.init_from's checkpoint

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's SentencePiece tokenizer."""
        return self.data.tokenizer


def build_training(cfg: DictConfig, model: Transformer | None = None) -> TrainingSetup:
    """Every object of a run from ``cfg``, in order (the seed is set before the model is
    initialised); ``model`` replaces the one the config describes (tests: checkpoints still
    record the config's ``model`` section)."""
    ctx, device = _setup_device(cfg)
    init_from = cfg.trainer.get("init_from")
    source, weights = load_init_source(init_from) if init_from else (None, {})
    data = _setup_data(cfg, ctx, checkpoint_tokenizer(cfg, source))
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    model = model or _setup_model(config["model"], data.tokenizer)
    if source is not None:  # before data parallelism wraps the model
        initialise_from(model, source, weights, config["model"], data.tokenizer)
        config["lineage"] = source.lineage()  # carried by the run's checkpoints
    model = model.to(device)
    optimizer = _setup_optimizer(cfg.optim, model, device)
    train_split = data.split("train")
    decay_steps = _setup_decay_steps(cfg, train_split, ctx)
    config["optim"]["decay_steps"] = decay_steps  # as resolved: the run's record says it
    precision = resolve_precision(cfg.trainer.precision, device)
    update = UpdateStep(
        model,
        optimizer,
        lr_schedule(
            optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, decay_steps, cfg.optim.min_lr
        ),
        OutputLayerLoss(cfg.trainer.label_smoothing, data.tokenizer.pad_id),
        device,
        precision=precision,
        clip_norm=cfg.trainer.clip_norm,
        scaler=grad_scaler(device, precision),
        ctx=ctx,
        compile=cfg.trainer.compile,
    )
    return TrainingSetup(
        cfg=cfg,
        config=config,
        dist=ctx,
        device=device,
        data=data,
        train_split=train_split,
        valid_split=data.split("valid"),
        valid=_setup_valid_set(cfg),
        model=model,
        update=update,
        init_source=source,
    )


def _setup_decay_steps(
    cfg: DictConfig, train_split: EncodedSplit, ctx: dist.DistContext
) -> int | None:
    """``optim.decay_steps``; for a cosine schedule, null becomes the run's planned updates
    (``trainer.max_steps``, else ``trainer.max_epochs`` epochs of this corpus's batches: as
    many in every epoch, since shuffling changes only their order and which of equally long
    examples share one)."""
    decay_steps, t = cfg.optim.decay_steps, cfg.trainer
    if cfg.optim.schedule != "cosine" or decay_steps is not None:
        return decay_steps
    batches = len(token_batches(train_split.src_lengths, train_split.tgt_lengths, t.max_tokens))
    planned = planned_updates(batches, ctx.world_size * t.update_freq, t.max_epochs, t.max_steps)
    if planned <= cfg.optim.warmup_steps:
        raise ConfigError(
            f"optim.decay_steps=null: the cosine schedule would end at the run's last planned "
            f"update, {planned} (trainer.max_epochs={t.max_epochs}, trainer.max_steps="
            f"{t.max_steps}), not after optim.warmup_steps={cfg.optim.warmup_steps}; set "
            "optim.decay_steps or train longer"
        )
    return planned


def _setup_device(cfg: DictConfig) -> tuple[dist.DistContext, torch.device]:
    """Check the config, join the process group, set threads, matmul precision and seeds."""
    device = resolve_device(cfg.trainer.device)
    ctx = dist.job_context()
    validate_config(cfg, device, ctx.world_size)  # before joining the job
    device = dist.init_distributed(ctx, device)
    configure_matmul(cfg.trainer.precision, device)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed + ctx.rank)  # each rank its own dropout stream
    return ctx, device


def _setup_data(cfg: DictConfig, ctx: dist.DistContext, spm_model: bytes | None) -> PreparedData:
    """The prepared corpus (tokenized with ``spm_model`` when given): rank 0 builds the cache,
    the other ranks then read it."""
    data = prepare_data(cfg.data, spm_model=spm_model) if ctx.is_main else None
    dist.barrier(ctx)
    return data if data is not None else prepare_data(cfg.data, spm_model=spm_model)


def _setup_valid_set(cfg: DictConfig) -> list[EvalSet]:
    return eval_sets(cfg.data, "valid", cfg.trainer.valid_max_sentences)


def _setup_model(model_cfg: dict[str, Any], tokenizer: Tokenizer) -> Transformer:
    return build_model(model_cfg, tokenizer.vocab_size, tokenizer.pad_id)


def _setup_optimizer(
    ocfg: DictConfig, model: Transformer, device: torch.device
) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        model.parameters(),
        lr=ocfg.lr,
        betas=tuple(ocfg.betas),
        eps=ocfg.eps,
        weight_decay=ocfg.weight_decay,
        # One fused kernel over all parameters: on a 2-core CPU an update of the small model
        # takes several times less time than the foreach or per-tensor versions.
        fused=device.type in ("cpu", "cuda"),
    )
