"""Which device to run on, and in which precision: the one place that turns ``auto`` /
``cpu`` / ``cuda[:N]`` into a ``torch.device``, and a precision name into an autocast context
(shared by training and decoding)."""

from __future__ import annotations

import contextlib

import torch

from transformer_mt.errors import ConfigError

# The half-precision settings and their types (fp32 and tf32 keep fp32 tensors).
HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device '{device}': {e}") from e


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device``: bf16 or fp16 autocast (matrix
    multiplies in that type, reductions such as softmax and norms in fp32), or a no-op for
    fp32 and tf32 (whose TF32 matmuls are a global setting)."""
    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=HALF_TYPES[precision])
