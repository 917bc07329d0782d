"""Checkpoint averaging (Vaswani et al. §6.1 average the last 5 or 20 checkpoints): the
parameter-wise mean of several checkpoints of one run, as a new checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from transformer_mt.errors import CheckpointError
from transformer_mt.formats.checkpoint import load_checkpoint, step_checkpoints
from transformer_mt.model import with_defaults


def last_checkpoints(run: Path, n: int) -> list[Path]:
    """The newest ``n`` step checkpoints of a run directory (or of its ``checkpoints/``)."""
    directory = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    found = step_checkpoints(directory)
    if len(found) < n:
        raise CheckpointError(
            f"{directory} holds {len(found)} checkpoint_<step>.pt file(s); {n} were asked for "
            "(trainer.keep_last limits how many a run keeps)"
        )
    return found[-n:]


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A SHA-1 of a model state: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha1()
    for name, tensor in weights.items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())  # the buffer, not a copy of it
    return digest.hexdigest()


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """A checkpoint whose weights are the mean of those of ``paths`` (summed in float64).

    The checkpoints must come from the same model config and SentencePiece model, and no
    two may hold the same weights: ``best.pt``, ``last.pt`` and ``final.pt`` are hard links
    to (or, where the filesystem has none, copies of) step checkpoints, and one listed beside
    its step checkpoint would count twice. The result carries the config, tokenizer, step and
    epoch of the last one, and no optimizer state (it is for translation, not for resuming).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    seen: dict[str, Path] = {}
    total: dict[str, torch.Tensor] = {}
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for path in paths:
        state = load_checkpoint(path)
        digest = weights_digest(state["model"])
        if digest in seen:
            raise CheckpointError(
                f"{path} holds the same weights as {seen[digest]}: it would count twice"
            )
        seen[digest] = path
        if not first:
            first = state
            total = {k: v.to(torch.float64) for k, v in state["model"].items()}
        else:
            if with_defaults(state["config"]["model"]) != with_defaults(first["config"]["model"]):
                raise CheckpointError(f"{path}: model config differs from that of {paths[0]}")
            if not torch.equal(state["spm_model"], first["spm_model"]):
                raise CheckpointError(f"{path}: SentencePiece model differs from {paths[0]}")
            if state["model"].keys() != total.keys():
                raise CheckpointError(f"{path}: parameter names differ from those of {paths[0]}")
            for k, v in state["model"].items():
                total[k] += v.to(torch.float64)
        last = state
    model = {
        k: (total[k] / len(paths)).to(v.dtype) if v.is_floating_point() else v
        for k, v in last["model"].items()
    }
    return {
        "model": model,
        "config": last["config"],
        "spm_model": last["spm_model"],
        "step": last["step"],
        "epoch": last["epoch"],
        "val_bleu": None,
        "averaged_from": [str(p) for p in paths],
    }
