"""``trainer.precision``: fp32, bf16 autocast (CPU and CUDA), or fp16 autocast with a gradient
scaler (CUDA only)."""

from __future__ import annotations

import contextlib

import torch

from transformer_mt.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ConfigError naming ``trainer.precision`` for an unknown or unsupported setting."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision must be one of {', '.join(PRECISIONS)}, got '{precision}'"
        )
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "trainer.precision=fp16 needs a CUDA device (it relies on a gradient scaler); "
            f"the device is '{device.type}'. Use trainer.precision=bf16 on CPU."
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (dynamic loss scaling), else None."""
    check_precision(precision, device)
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
