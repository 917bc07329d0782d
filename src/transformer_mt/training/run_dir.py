"""A run's ``checkpoints/`` folder: which checkpoints are kept, and which one resumes.

It holds ``checkpoint_<step>.pt`` files plus ``last.pt`` and ``best.pt``, hard links to the
newest and the best-by-val-BLEU checkpoint (copies where the filesystem has no hard links),
and at the end ``averaged.pt`` and ``final.pt``. The file format itself is
:mod:`transformer_mt.formats.checkpoint`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from transformer_mt.errors import CheckpointError
from transformer_mt.formats.atomic import atomic_link
from transformer_mt.formats.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints


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

    @property
    def averaged_path(self) -> Path:
        """``averaged.pt``: the mean of the last checkpoints (written at the end)."""
        return self.directory / "averaged.pt"

    @property
    def final_path(self) -> Path:
        """``final.pt``: the checkpoint the final evaluation chose on val (the one to use)."""
        return self.directory / "final.pt"

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
