"""``trainer.precision``: auto (the device's best), fp32, tf32 (fp32 with TF32 tensor-core
matmuls, CUDA only), bf16 autocast (CPU and CUDA), or fp16 autocast with a gradient scaler
(CUDA only); and the matmul settings that go with it, set once in :func:`configure_matmul`."""

from __future__ import annotations

import contextlib

import torch

from transformer_mt.device import autocast as device_autocast
from transformer_mt.errors import ConfigError

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


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
    if precision == "tf32" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=tf32 needs a CUDA device; the device is '{device.type}'. "
            "Use trainer.precision=fp32 (or auto) on CPU."
        )


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it (Ampere and newer, which also have
    TF32 for the fp32 rest), else fp32: on older GPUs and on a CPU (on the CPUs measured,
    bf16 autocast trains the default model more slowly than fp32); others unchanged."""
    check_precision(precision, device)
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def configure_matmul(precision: str, device: torch.device) -> None:
    """The one place that sets torch's float32 matmul precision: on CUDA, TF32 tensor cores for
    fp32 matmuls (those left outside autocast) unless ``precision`` is (or ``auto`` resolves
    to) ``fp32``, which keeps full-precision (IEEE) matmuls. A no-op on CPU."""
    if device.type != "cuda":
        return
    tf32 = resolve_precision(precision, device) != "fp32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (``auto`` resolved) on ``device``; a no-op for
    fp32 and tf32."""
    return device_autocast(device, resolve_precision(precision, device))


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (dynamic loss scaling), else None."""
    precision = resolve_precision(precision, device)
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
