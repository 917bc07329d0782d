"""Which device to run on: the one place that turns ``auto`` / ``cpu`` / ``cuda[:N]`` into a
``torch.device``."""

from __future__ import annotations

import torch

from transformer_mt.errors import ConfigError


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
