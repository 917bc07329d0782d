"""Self-contained checkpoints (weights, config, SentencePiece model), written atomically, and
the run's checkpoint folder: keep the last K and the best K, find the newest good one.

A run's ``checkpoints/`` folder holds ``checkpoint_<step>.pt`` files plus ``last.pt`` and
``best.pt``, which are hard links to the newest and the best-by-val-BLEU checkpoint (copies
where the filesystem has no hard links).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from transformer_mt.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "save_checkpoint",
    "spm_bytes_to_tensor",
    "spm_tensor_to_bytes",
]


REQUIRED_KEYS = ("model", "config", "spm_model", "step", "epoch")


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself durable
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy if links are unsupported), atomically."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict (tensors, plain containers, strings) atomically."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def spm_bytes_to_tensor(data: bytes) -> torch.Tensor:
    """SentencePiece model bytes -> uint8 tensor (loadable with weights_only=True)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def spm_tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Inverse of :func:`spm_bytes_to_tensor`."""
    return t.numpy().tobytes()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; clear errors for bad files."""
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
    return state


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


class CheckpointManager:
    """Writes ``checkpoint_<step>.pt`` files and keeps the last ``keep_last`` and the best
    ``keep_best`` (by val BLEU) of them; ``last.pt``/``best.pt`` point at the newest/best.

    ``scores`` maps a checkpoint's file name to its val BLEU; it is part of the training
    state so that a resumed run keeps pruning correctly.
    """

    def __init__(self, directory: Path, keep_last: int, keep_best: int) -> None:
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last must be ≥ 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.scores: dict[str, float] = {}

    @property
    def best_path(self) -> Path:
        """``best.pt``: the checkpoint with the best val BLEU so far."""
        return self.directory / "best.pt"

    @property
    def last_path(self) -> Path:
        """``last.pt``: the newest checkpoint."""
        return self.directory / "last.pt"

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of update ``step`` goes."""
        return self.directory / f"checkpoint_{step:07d}.pt"

    def record_score(self, step: int, val_bleu: float) -> None:
        """Remember the val BLEU of the checkpoint of ``step`` (for keeping the best K)."""
        self.scores[self.path_for(step).name] = val_bleu

    def save(self, state: dict[str, Any], is_best: bool) -> Path:
        """Write the checkpoint of ``state["step"]``, update the links, prune old files."""
        path = self.path_for(int(state["step"]))
        save_checkpoint(path, state)
        atomic_link(path, self.last_path)
        if is_best:
            atomic_link(path, self.best_path)
        self.prune()
        return path

    def prune(self) -> None:
        """Delete the step checkpoints that are neither among the last K nor the best K."""
        files = step_checkpoints(self.directory)
        keep = {p.name for p in files[-self.keep_last :]}
        scored = [p.name for p in files if p.name in self.scores]
        scored.sort(key=lambda name: self.scores[name], reverse=True)
        keep.update(scored[: self.keep_best])
        for p in files:
            if p.name not in keep:
                p.unlink()
        self.scores = {k: v for k, v in self.scores.items() if k in keep}

    def newest_good(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest step checkpoint that loads, with its state, or None if there is none.

        Unreadable ones (a truncated file from a crash, a corrupt disk block) are renamed to
        ``<name>.corrupt`` with a warning naming them, never deleted.
        """
        for path in reversed(step_checkpoints(self.directory)):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as e:
                bad = path.with_name(path.name + ".corrupt")
                print(f"warning: {e}; skipping it (renamed to {bad.name})", file=sys.stderr)
                os.replace(path, bad)
        return None
