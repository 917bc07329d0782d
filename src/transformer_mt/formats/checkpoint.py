"""The checkpoint file: one self-contained ``.pt`` file per checkpoint.

A checkpoint is a dict of tensors, plain containers and strings, loadable with
``torch.load(weights_only=True)``:

    model      the weights (state dict)
    config     the resolved run config (``model``, ``data``, ``trainer``, ... sections)
    spm_model  the SentencePiece model's bytes as a uint8 tensor
    step       the update the weights come from; ``epoch`` the completed epochs
    val_bleu   greedy val BLEU at that step, or None

plus, in checkpoints written during training, the training state (``optimizer``,
``scheduler``, ``scaler``, ``rng``, ``trainer``) that resuming needs. A run's
``checkpoints/`` folder names them ``checkpoint_<step>.pt``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from transformer_mt.errors import CheckpointError
from transformer_mt.formats.atomic import atomic_write_bytes

__all__ = [
    "REQUIRED_KEYS",
    "checkpoint_step",
    "load_checkpoint",
    "save_checkpoint",
    "spm_bytes_to_tensor",
    "spm_tensor_to_bytes",
    "step_checkpoints",
]

REQUIRED_KEYS = ("model", "config", "spm_model", "step", "epoch")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically; it must hold :data:`REQUIRED_KEYS`."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; a missing, truncated or
    foreign file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle refused, not a torch file ...
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is not a transformer_mt checkpoint (needs keys {list(REQUIRED_KEYS)})"
        )
    problem = _malformed(state)
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
    return state


def _malformed(state: dict[str, Any]) -> str | None:
    """What is wrong with the types of a checkpoint's required entries, if anything."""
    weights, config, spm = state["model"], state["config"], state["spm_model"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        return "'model' must map parameter names to tensors"
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return "'config' must hold a 'model' section (the model's settings)"
    if not isinstance(spm, torch.Tensor) or spm.dtype != torch.uint8 or spm.dim() != 1:
        return "'spm_model' must be the SentencePiece model's bytes as a uint8 tensor"
    for key in ("step", "epoch"):
        if isinstance(state[key], bool) or not isinstance(state[key], int):
            return f"'{key}' must be an integer, got {state[key]!r}"
    return None


def spm_bytes_to_tensor(data: bytes) -> torch.Tensor:
    """SentencePiece model bytes -> uint8 tensor (loadable with weights_only=True)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def spm_tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Inverse of :func:`spm_bytes_to_tensor`."""
    return t.numpy().tobytes()


_STEP_FILE = re.compile(r"checkpoint_(\d+)\.pt")


def checkpoint_step(path: Path) -> int | None:
    """The update number in a ``checkpoint_<step>.pt`` name, else None."""
    m = _STEP_FILE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def step_checkpoints(directory: Path) -> list[Path]:
    """The ``checkpoint_<step>.pt`` files of ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)
