"""``results.json``: what a run measured at its end, and which checkpoint and α to use.

One owner for the file: :class:`RunResults` writes it (``tmt-train``'s final evaluation, a
failed run of a sweep) and reads it (the sweep summary, the α lookup of ``tmt-evaluate``,
``tmt-translate``, ``tmt-export`` and :class:`~transformer_mt.decoding.Translator`). Layout::

    {"steps": 8130, "epochs": 30, "stop_reason": "", "train_minutes": 37.7,
     "nonfinite_updates": 0, "best_val_bleu_greedy": 38.3,
     "final": "averaged.pt",                      # the file checkpoints/final.pt links to
     "checkpoints": {"best.pt": {...}, "averaged.pt": {
         "step": 8130, "beam_size": 5, "alpha": 3.0,
         "alpha_grid": {"0.6": 38.9, ...},        # val BLEU at each α tried
         "valid": {"bleu": 39.6, "chrf": 64.2, "signature": "nrefs:1|..."},
         "test": {"test_2016_flickr": {"bleu": 38.5, ...}}}}}

A multilingual run's sets are named by direction (``test_2016_flickr.en-de``); its
``valid`` is the mean over the directions, and ``valid_sets`` holds each direction's.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformer_mt.errors import ResultsError
from transformer_mt.formats.atomic import atomic_write_text

__all__ = ["RESULTS_FILE", "CheckpointResult", "RunResults", "Score", "tuned_alpha", "tuned_alphas"]

RESULTS_FILE = "results.json"


@dataclass
class Score:
    """Corpus BLEU and chrF of one decoded set, with sacreBLEU's BLEU signature."""

    bleu: float
    chrf: float
    signature: str


@dataclass
class CheckpointResult:
    """The final evaluation of one checkpoint: the α chosen on val, val and test scores."""

    step: int
    beam_size: int
    alpha: float
    valid: Score
    test: dict[str, Score] = field(default_factory=dict)  # test set name -> its score
    alpha_grid: dict[str, float] = field(default_factory=dict)  # α -> val BLEU, when tuned
    valid_sets: dict[str, Score] = field(default_factory=dict)  # per direction (multilingual)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointResult:
        """Inverse of ``dataclasses.asdict``; KeyError/TypeError/ValueError on a bad shape."""
        alpha = _number(d["alpha"], "alpha")
        if not 0.0 <= alpha < math.inf:
            raise ValueError(f"alpha must be finite and ≥ 0, got {alpha}")
        return cls(
            step=int(_number(d["step"], "step")),
            beam_size=int(_number(d["beam_size"], "beam_size")),
            alpha=alpha,
            valid=Score(**d["valid"]),
            test={name: Score(**s) for name, s in d.get("test", {}).items()},
            alpha_grid={str(a): float(b) for a, b in d.get("alpha_grid", {}).items()},
            valid_sets={name: Score(**s) for name, s in d.get("valid_sets", {}).items()},
        )


@dataclass
class RunResults:
    """A run's ``results.json``."""

    steps: int = 0
    epochs: int = 0
    stop_reason: str = ""
    train_minutes: float = 0.0
    nonfinite_updates: int = 0
    best_val_bleu_greedy: float | None = None
    final: str | None = None  # name of the checkpoint file final.pt links to
    checkpoints: dict[str, CheckpointResult] = field(default_factory=dict)  # file name -> result

    def write(self, run_dir: Path) -> Path:
        """Write ``<run_dir>/results.json`` atomically; returns its path."""
        path = Path(run_dir) / RESULTS_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: Path) -> RunResults:
        """Read ``<run_dir>/results.json``; ResultsError naming the file if it is unreadable
        or not in this format."""
        path = Path(run_dir) / RESULTS_FILE
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                steps=int(d["steps"]),
                epochs=int(d["epochs"]),
                stop_reason=str(d["stop_reason"]),
                train_minutes=float(d["train_minutes"]),
                nonfinite_updates=int(d["nonfinite_updates"]),
                best_val_bleu_greedy=_optional_float(d["best_val_bleu_greedy"]),
                final=None if d.get("final") is None else str(d["final"]),
                checkpoints={
                    str(name): CheckpointResult.from_dict(r)
                    for name, r in d.get("checkpoints", {}).items()
                },
            )
        except OSError as e:
            raise ResultsError(f"cannot read {path}: {e}") from e
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ResultsError(f"{path} is not a transformer_mt results file: {e!r}") from e

    @property
    def final_result(self) -> CheckpointResult | None:
        """The evaluation of the checkpoint final.pt links to, if any."""
        return self.checkpoints.get(self.final) if self.final else None

    def alpha_for(self, checkpoint: Path, step: int, beam_size: int) -> float | None:
        """The α chosen on val for ``checkpoint`` (a file in this run's ``checkpoints/``
        folder; a hard link such as final.pt counts) at ``step`` and ``beam_size``."""
        return self.alphas_for(checkpoint, step).get(beam_size)

    def alphas_for(self, checkpoint: Path, step: int) -> dict[int, float]:
        """The α chosen on val for ``checkpoint`` at ``step`` (see :meth:`alpha_for`), by
        beam size: every beam size it was evaluated at."""
        checkpoint = Path(os.path.abspath(checkpoint))
        alphas: dict[int, float] = {}
        for name, result in self.checkpoints.items():
            if result.step != step or result.beam_size in alphas:
                continue
            candidate = checkpoint.parent / name
            if candidate.is_file() and os.path.samefile(candidate, checkpoint):
                alphas[result.beam_size] = result.alpha
        return alphas


def tuned_alpha(checkpoint: str | Path, step: int | None, beam_size: int) -> float | None:
    """The length penalty the final evaluation of ``checkpoint``'s run chose for it at
    ``beam_size``, or None (see :func:`tuned_alphas`; greedy search has no length penalty)."""
    return None if beam_size == 1 else tuned_alphas(checkpoint, step).get(beam_size)


def tuned_alphas(checkpoint: str | Path, step: int | None) -> dict[int, float]:
    """The length penalties the final evaluation of ``checkpoint``'s run chose for it, by
    beam size (greedy left out: it has no length penalty).

    Read from ``results.json`` of the run (``<run>/checkpoints/x.pt`` -> ``<run>/results.json``).
    Empty for an unknown step, a results.json older than the checkpoint (rewritten later,
    e.g. by tmt-average, or a run retrained in the same folder) and anything unreadable.
    """
    if step is None:
        return {}
    checkpoint = Path(os.path.abspath(checkpoint))
    run_dir = checkpoint.parent.parent
    try:
        if (run_dir / RESULTS_FILE).stat().st_mtime_ns < checkpoint.stat().st_mtime_ns:
            return {}
        results = RunResults.read(run_dir)
    except (OSError, ResultsError):
        return {}
    alphas = results.alphas_for(checkpoint, step)
    return {beam: alpha for beam, alpha in alphas.items() if beam > 1}


def _number(value: Any, key: str) -> float:
    """``value`` as a float if it is a JSON number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number, got {value!r}")
    return float(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else _number(value, "best_val_bleu_greedy")
