"""tmt-prepare: fetch, validate, tokenize and cache a corpus (Hydra; same config tree as training).

tmt-prepare data=multi30k_en_de data.tokenizer.vocab_size=10000
tmt-prepare data=... trainer.init_from=CKPT data.tokenizer.from_checkpoint=true  # CKPT's SentencePiece
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from transformer_mt.cli.common import config_dir, exit_on_user_error, register_resolvers
from transformer_mt.data.prepare import prepare_data
from transformer_mt.training.config import check_data
from transformer_mt.training.init_from import checkpoint_tokenizer

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Prepare ``cfg.data`` under ``data.prepared_dir`` (a no-op when the cache is current);
    with ``data.tokenizer.from_checkpoint=true`` tokenized with the SentencePiece model of
    ``trainer.init_from``, as ``tmt-train`` will."""
    check_data(cfg)
    prepared = prepare_data(cfg.data, spm_model=checkpoint_tokenizer(cfg))
    print(prepared.directory)


if __name__ == "__main__":
    main()
