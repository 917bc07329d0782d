"""tmt-train: train a Transformer (Hydra overrides on the command line).

tmt-train data.tgt_lang=fr model=small trainer.max_epochs=20 optim.lr=7e-4
tmt-train -m optim.lr=5e-4,7e-4 model.dropout=0.1,0.3          # a sweep
torchrun --nproc_per_node=2 -m transformer_mt.cli.train ...     # data-parallel
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transformer_mt.cli.common import config_dir, exit_on_user_error, register_resolvers
from transformer_mt.errors import UserError
from transformer_mt.training.checkpoint import atomic_write_text
from transformer_mt.training.distributed import env_rank, shutdown_distributed
from transformer_mt.training.trainer import Trainer

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@exit_on_user_error
def train(cfg: DictConfig) -> float:
    """Train with ``cfg``; prints the best checkpoint and its val/test scores. Returns val BLEU."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        trainer = Trainer(cfg, run_dir)
        if trainer.dist.is_main:
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        result = trainer.train()
    except UserError as e:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # In a sweep one failed run (a diverging lr, say) must not stop the others: record
        # it for the sweep summary and go on.
        print(f"error: {e}", file=sys.stderr, flush=True)
        failure = {"stop_reason": f"failed: {e}", "best_val_bleu_greedy": None}
        atomic_write_text(run_dir / "results.json", json.dumps(failure, indent=2) + "\n")
        return float("nan")
    finally:
        shutdown_distributed()
    if env_rank() == 0:
        print(f"best checkpoint: {result.best_checkpoint}")
        print(f"best greedy val BLEU during training: {result.best_val_bleu:.2f}")
        averaged = result.final.get("averaged", {})
        for name, final in (("best", result.final), ("averaged", averaged)):
            for role in ("valid", "test"):
                if role in final:
                    r, search = final[role], f"beam {final['beam_size']}, α {final['alpha']:g}"
                    if "alpha_grid" in final:
                        search += " tuned on val"
                    print(
                        f"{name} {role} ({search}): BLEU {r['bleu']:.2f} "
                        f"chrF {r['chrf']:.2f}  [{r['signature']}]"
                    )
    return result.best_val_bleu


def main() -> None:
    """Console entry point. Ranks other than 0 of a distributed job write no Hydra files."""
    if env_rank() > 0:
        sys.argv.append("hydra.output_subdir=null")
    train()


if __name__ == "__main__":
    main()
