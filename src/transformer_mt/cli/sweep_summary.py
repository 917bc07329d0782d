"""After a Hydra multirun (``tmt-train -m ...``): one table of the val BLEU of every run.

Each run writes ``results.json`` into its directory; this callback collects them into
``<sweep dir>/summary.tsv`` and prints the table, best run first, with the overrides that
vary between the runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transformer_mt.formats.atomic import atomic_write_text
from transformer_mt.formats.results import RESULTS_FILE, RunResults

COLUMNS = (
    "run",
    "overrides",
    "best_val_bleu_greedy",
    "val_bleu_beam",
    "test_bleu_beam",
    "steps",
    "stopped",
)


def run_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for a run (``.hydra/overrides.yaml``)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def varying(overrides: list[list[str]]) -> list[str]:
    """Per run, the overrides that are not shared by every run (the swept values)."""
    shared = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    return [",".join(o for o in run if o not in shared) for run in overrides]


def summarize_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """The rows of the summary table of ``sweep_dir``, best greedy val BLEU first; the beam
    columns are those of each run's final.pt."""
    runs = sorted(sweep_dir.glob(f"*/{RESULTS_FILE}"))
    swept = varying([run_overrides(results.parent) for results in runs])
    rows = []
    for results, overrides in zip(runs, swept, strict=True):
        r = RunResults.read(results.parent)
        final = r.final_result
        tests = list(final.test.values()) if final else []
        rows.append(
            {
                "run": results.parent.name,
                "overrides": overrides,
                "best_val_bleu_greedy": r.best_val_bleu_greedy,
                "val_bleu_beam": final.valid.bleu if final else None,
                "test_bleu_beam": tests[0].bleu if tests else None,
                "steps": r.steps,
                "stopped": r.stop_reason or "completed",
            }
        )
    rows.sort(key=lambda row: -(row["best_val_bleu_greedy"] or -1.0))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Tab-separated, with a header line; numbers with two decimals, missing ones as '-'."""

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["\t".join(COLUMNS)] + ["\t".join(cell(row[c]) for c in COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, write and print the sweep's summary."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Collect the runs' results.json into ``summary.tsv`` and print it."""
        sweep_dir = Path(config.hydra.sweep.dir)
        table = format_table(summarize_sweep(sweep_dir))
        atomic_write_text(sweep_dir / "summary.tsv", table)
        print(f"sweep summary ({sweep_dir / 'summary.tsv'}):\n{table}", end="", flush=True)
