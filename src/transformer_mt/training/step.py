"""One update: forward, label-smoothed loss, backward, clip, optimizer step.

An update consumes this rank's micro-batches ``[(batch, weight), ...]`` (gradient
accumulation; with data parallelism every rank holds its share). Their summed loss is
divided by the real target tokens of the whole update on all ranks (counted on the host
from the batch plan every rank shares), so accumulation and data parallelism give the
gradient of one big batch. A non-finite gradient norm skips the update. The update's one
host sync is its gradient norm. :class:`UpdateStep` needs no run directory: benchmarks and
tests use it as it is.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer_mt.data.batching import Batch
from transformer_mt.model import Transformer
from transformer_mt.training import distributed as dist
from transformer_mt.training.loss import OutputLayerLoss
from transformer_mt.training.precision import autocast


class Outcome(Enum):
    """What became of an update."""

    APPLIED = "applied"
    OVERFLOW = (
        "overflow"  # fp16: inf/nan gradients, the scaler skipped the step and lowered its scale
    )
    NONFINITE = "nonfinite"  # a non-finite loss or gradient; the update was skipped


@dataclass
class StepResult:
    """One update: this rank's summed loss (on the device, no host sync), the update's target
    tokens on all ranks, its gradient norm before clipping, and its outcome."""

    loss: torch.Tensor
    tokens: int
    grad_norm: float
    outcome: Outcome


class UpdateStep:
    """The update rule of a run: model, optimizer, learning-rate schedule, loss, precision."""

    def __init__(
        self,
        model: Transformer,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        criterion: OutputLayerLoss,
        device: torch.device,
        precision: str = "fp32",
        clip_norm: float = 1.0,
        scaler: torch.amp.GradScaler | None = None,
        ctx: dist.DistContext | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.criterion = criterion
        self.device = device
        self.precision = precision
        self.clip_norm = clip_norm
        self.scaler = scaler
        self.dist = ctx or dist.DistContext()
        self.ddp = None
        if self.dist.enabled:  # the positional table is a constant: no buffers to broadcast
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        # What the training forward runs: the (DDP-wrapped) model, compiled on request.
        self.train_module: torch.nn.Module = self.ddp or model
        if compile:
            self.train_module = torch.compile(self.train_module)  # type: ignore[assignment]

    def loss(self, module: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed label-smoothed loss and NLL of ``batch`` (on the device) through ``module``
        (the model, or its DDP/compiled wrapper), at the real target positions only."""
        with autocast(self.device, self.precision):
            hidden = module(batch.src, batch.tgt_in, batch.tgt_positions, project=False)
            return self.criterion(hidden, self.model.output_projection.weight, batch.real_targets())

    def __call__(
        self, batches: list[tuple[Batch, float]], global_tokens: int | None = None
    ) -> StepResult:
        """One update from this rank's micro-batches ``[(batch, weight), ...]``.
        ``global_tokens`` is the update's target tokens on all ranks; without it they are
        summed with a collective. The learning rate schedule advances only when the update
        is applied."""
        module = self.train_module
        module.train()
        if global_tokens is None:
            local_tokens = sum(b.n_tgt_tokens * w for b, w in batches)
            global_tokens = int(dist.all_reduce_sum(local_tokens, self.dist, self.device))
        scale = self.dist.world_size / global_tokens  # DDP averages gradients over ranks
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, (batch, weight) in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = self.ddp.no_sync() if self.ddp and not last else contextlib.nullcontext()
            batch = batch.to(self.device)
            with no_sync:
                loss, _ = self.loss(module, batch)
                scaled = loss * (scale * weight)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach() * weight
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.clip_norm if self.clip_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = math.isfinite(grad_norm)  # the float() above: the one host sync per update
        if finite:  # (gradients already unscaled: scaler.step would only sync to check again)
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # on the device: lowers the scale after an overflow
        if not finite:
            overflow = self.scaler is not None and self.scaler.get_scale() >= 1.0
            outcome = Outcome.OVERFLOW if overflow else Outcome.NONFINITE
            return StepResult(total, global_tokens, grad_norm, outcome)
        self.scheduler.step()
        return StepResult(total, global_tokens, grad_norm, Outcome.APPLIED)
