"""Learning-rate schedules: the paper's (§5.3) linear warmup, then inverse square root decay;
or the same warmup, then a cosine decay to a floor at a set update (Loshchilov & Hutter 2017,
"SGDR: Stochastic Gradient Descent with Warm Restarts", without the restarts), by default the
run's last planned update (:func:`planned_updates`)."""

from __future__ import annotations

import math

import torch

from transformer_mt.errors import ConfigError

SCHEDULES = ("inverse_sqrt", "cosine")


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """min(step / warmup, sqrt(warmup / step)): 1.0 at the end of warmup.

    With peak lr = d_model^-0.5 · warmup^-0.5 this is exactly the paper's
    lrate = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).
    """
    step = max(step, 1)
    return min(step / warmup_steps, (warmup_steps / step) ** 0.5)


def cosine_factor(step: int, warmup_steps: int, decay_steps: int, floor: float) -> float:
    """step / warmup during warmup; then floor + (1 - floor) · (1 + cos(π·p)) / 2, where
    p = (step - warmup) / (decay_steps - warmup) runs from 0 to 1; ``floor`` from update
    ``decay_steps`` on. ``floor`` is the final lr as a fraction of the peak."""
    step = max(step, 1)
    if step <= warmup_steps:
        return step / warmup_steps
    progress = min((step - warmup_steps) / (decay_steps - warmup_steps), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_updates(
    batches_per_epoch: int, batches_per_update: int, max_epochs: int, max_steps: int | None
) -> int:
    """The updates a run plans: ``max_epochs`` epochs of ⌈batches_per_epoch /
    batches_per_update⌉ updates (an epoch's last update may be short), or ``max_steps`` if
    that comes first. ``trainer.max_minutes`` and early stopping may end the run sooner."""
    per_epoch = math.ceil(batches_per_epoch / batches_per_update)
    planned = max_epochs * per_epoch
    return planned if max_steps is None else min(planned, max_steps)


def check_schedule(
    schedule: str, warmup_steps: int, decay_steps: int | None, min_lr: float, lr: float
) -> None:
    """``optim.schedule`` is known; cosine's ``optim.decay_steps`` (None: the run's planned
    updates, resolved by the caller) comes after the warmup and its ``optim.min_lr`` is in
    [0, ``optim.lr``); the other schedule leaves both unset."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule}: not one of {' | '.join(SCHEDULES)}")
    if warmup_steps <= 0:
        raise ConfigError(f"optim.warmup_steps must be positive, got {warmup_steps}")
    if schedule != "cosine":
        if decay_steps is not None or min_lr != 0:
            raise ConfigError(
                f"optim.decay_steps={decay_steps} and optim.min_lr={min_lr} are for "
                f"optim.schedule=cosine; with {schedule} leave them at null and 0"
            )
        return
    if decay_steps is not None and decay_steps <= warmup_steps:
        raise ConfigError(
            f"optim.schedule=cosine needs optim.decay_steps (the update at which the lr reaches "
            f"optim.min_lr) above optim.warmup_steps={warmup_steps}, got {decay_steps}"
        )
    if not 0 <= min_lr < lr:
        raise ConfigError(f"optim.min_lr must be in [0, optim.lr={lr}), got {min_lr}")


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    schedule: str = "inverse_sqrt",
    warmup_steps: int = 4000,
    decay_steps: int | None = None,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler whose lr is ``peak_lr · factor(step)`` for the named schedule; peak_lr is
    the optimizer's lr, and cosine's floor is ``min_lr`` over the first group's peak. Cosine
    needs ``decay_steps`` (training resolves ``optim.decay_steps: null`` with
    :func:`planned_updates` first)."""
    peak = float(optimizer.param_groups[0]["lr"])
    check_schedule(schedule, warmup_steps, decay_steps, min_lr, peak)
    if schedule == "cosine":
        if decay_steps is None:
            raise ConfigError(
                "optim.schedule=cosine needs optim.decay_steps here (an update count)"
            )
        floor = min_lr / peak

        def factor(done: int) -> float:
            return cosine_factor(done + 1, warmup_steps, decay_steps, floor)
    else:

        def factor(done: int) -> float:
            return inverse_sqrt_factor(done + 1, warmup_steps)

    # LambdaLR counts completed updates from 0; the paper's step_num counts from 1.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def inverse_sqrt_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler whose lr is ``peak_lr · inverse_sqrt_factor(step)``; peak_lr is the optimizer's lr."""
    return lr_schedule(optimizer, "inverse_sqrt", warmup_steps)
