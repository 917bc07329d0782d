"""tmt-train: train a Transformer (Hydra overrides on the command line).

tmt-train data.tgt_lang=fr model=small trainer.max_epochs=20 optim.lr=7e-4
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from transformer_mt.cli.common import config_dir, exit_on_user_error
from transformer_mt.training.checkpoint import atomic_write_text
from transformer_mt.training.trainer import Trainer


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Train with ``cfg``; prints the best checkpoint and its val/test scores. Returns val BLEU."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    result = Trainer(cfg, run_dir).train()
    print(f"best checkpoint: {result.best_checkpoint}")
    print(f"best greedy val BLEU during training: {result.best_val_bleu:.2f}")
    for role in ("valid", "test"):
        if role in result.final:
            r = result.final[role]
            print(
                f"{role} (beam {result.final['beam_size']}): BLEU {r['bleu']:.2f} "
                f"chrF {r['chrf']:.2f}  [{r['signature']}]"
            )
    return result.best_val_bleu


if __name__ == "__main__":
    main()
