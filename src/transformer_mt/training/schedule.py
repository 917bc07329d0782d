"""The paper's learning-rate schedule (§5.3): linear warmup, then inverse square root decay."""

from __future__ import annotations

import torch

from transformer_mt.errors import ConfigError


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """min(step / warmup, sqrt(warmup / step)): 1.0 at the end of warmup.

    With peak lr = d_model^-0.5 · warmup^-0.5 this is exactly the paper's
    lrate = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).
    """
    step = max(step, 1)
    return min(step / warmup_steps, (warmup_steps / step) ** 0.5)


def inverse_sqrt_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler whose lr is ``peak_lr · inverse_sqrt_factor(step)``; peak_lr is the optimizer's lr."""
    if warmup_steps <= 0:
        raise ConfigError(f"optim.warmup_steps must be positive, got {warmup_steps}")
    # LambdaLR counts completed updates from 0; the paper's step_num counts from 1.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: inverse_sqrt_factor(done + 1, warmup_steps)
    )
