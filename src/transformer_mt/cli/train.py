"""tmt-train: train a Transformer (Hydra overrides on the command line).

tmt-train data.tgt_lang=fr model=small trainer.max_epochs=20 optim.lr=7e-4
tmt-train -m optim.lr=5e-4,7e-4 model.dropout=0.1,0.3          # a sweep
torchrun --nproc_per_node=2 -m transformer_mt.cli.train ...     # data-parallel
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transformer_mt.cli.common import config_dir, exit_on_user_error, register_resolvers
from transformer_mt.errors import ResultsError, UserError
from transformer_mt.formats.atomic import atomic_write_text
from transformer_mt.formats.results import RESULTS_FILE, RunResults
from transformer_mt.training.distributed import env_rank, shutdown_distributed
from transformer_mt.training.finish import TrainResult
from transformer_mt.training.trainer import Trainer

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@exit_on_user_error
def train(cfg: DictConfig) -> float:
    """Train with ``cfg``; prints the checkpoint to use and its val/test scores. Returns the
    best greedy val BLEU (the sweep objective)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        trainer = Trainer(cfg, run_dir)
        if trainer.dist.is_main:
            # The run's config as its checkpoints record it (derived values resolved).
            config = OmegaConf.create(trainer.setup.config)
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))
        result = trainer.train()
    except UserError as e:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # In a sweep one failed run (a diverging lr, say) must not stop the others: record
        # it for the sweep summary and go on.
        print(f"error: {e}", file=sys.stderr, flush=True)
        record_failure(run_dir, str(e))
        return float("nan")
    finally:
        shutdown_distributed()
    if env_rank() == 0:
        print(report(result))
    return result.best_val_bleu


def record_failure(run_dir: Path, message: str) -> None:
    """Write a failed sweep run's ``results.json`` for the sweep summary, unless the run
    directory already holds the results of a finished run (a relaunched sweep whose job
    failed this time): those, with the α its checkpoints were tuned at, are kept."""
    if (run_dir / RESULTS_FILE).is_file():
        try:
            old = RunResults.read(run_dir)
        except ResultsError:
            old = RunResults()  # unreadable: replaced by the failure
        if old.steps > 0 and not old.stop_reason.startswith("failed:"):
            print(
                f"note: {run_dir / RESULTS_FILE} of the finished run kept (this launch "
                f"failed: {message})",
                file=sys.stderr,
            )
            return
    RunResults(stop_reason=f"failed: {message}").write(run_dir)


def report(result: TrainResult) -> str:
    """The end-of-run summary: every evaluated checkpoint's val BLEU, then the checkpoint to
    use (final.pt, chosen on val) with its val and test scores."""
    lines = [f"best greedy val BLEU during training: {result.best_val_bleu:.2f}"]
    evaluated = result.results.checkpoints
    for name, r in evaluated.items():
        tuned = " tuned on val" if r.alpha_grid else ""
        lines.append(
            f"{name}: val BLEU {r.valid.bleu:.2f} (beam {r.beam_size}, α {r.alpha:g}{tuned})"
        )
    final = result.results.final_result
    if result.final_checkpoint is None or final is None:
        lines.append(f"best checkpoint: {result.best_checkpoint} (trainer.final_eval=false)")
        return "\n".join(lines)
    lines.append(
        f"final checkpoint: {result.final_checkpoint} -> {result.results.final} "
        f"(chosen on val; use this one)"
    )
    search = f"beam {final.beam_size}, α {final.alpha:g}"
    valid = "val, mean of the directions" if final.valid_sets else "val"
    rows = [(valid, final.valid), *final.valid_sets.items(), *final.test.items()]
    for name, s in rows:  # a multilingual run: a row per direction
        lines.append(f"  {name} ({search}): BLEU {s.bleu:.2f} chrF {s.chrf:.2f}  [{s.signature}]")
    return "\n".join(lines)


def main() -> None:
    """Console entry point. Ranks other than 0 of a distributed job write no Hydra files."""
    if env_rank() > 0:
        sys.argv.append("hydra.output_subdir=null")
    train()


if __name__ == "__main__":
    main()
