"""Fine-tuning: a new run that starts from the weights of another run's checkpoint.

``trainer.init_from=CKPT`` loads the weights of CKPT into the new run's model before training
(and before data parallelism wraps it); the optimizer, learning-rate schedule, counters and
RNGs start fresh from the run's own config and seed, as in the pre-train/fine-tune recipe of
the Transformer transfer literature (e.g. Zoph et al. 2016, "Transfer Learning for
Low-Resource Neural Machine Translation"). The two runs must share the architecture (every
``model`` key but the dropout rates) and the SentencePiece model;
``data.tokenizer.from_checkpoint=true`` prepares the new data with CKPT's SentencePiece model
instead of training one. The source is recorded as the run's *lineage*: a list of
``{"checkpoint", "step", "sha256"}`` entries, newest first, under ``lineage`` in the config
its checkpoints carry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.formats.checkpoint import load_checkpoint, spm_tensor_to_bytes
from transformer_mt.model import Transformer, with_defaults

# ``model`` keys a fine-tuning run may change: they change no shapes and no computation of a
# trained model at inference.
FREE_KEYS = frozenset({"dropout", "attention_dropout"})
_UNSET = object()  # a key neither the config nor the constructor's defaults give


@dataclass(frozen=True)
class InitSource:
    """The checkpoint a fine-tuning run starts from (its weights are returned beside it)."""

    path: Path
    step: int
    sha256: str  # of the checkpoint file
    config: dict[str, Any]  # the resolved config of the run that wrote it
    spm_model: bytes

    def describe(self) -> str:
        """``PATH (step N, sha256 0123456789ab)``, for log lines."""
        return f"{self.path} (step {self.step}, sha256 {self.sha256[:12]})"

    def lineage(self) -> list[dict[str, Any]]:
        """This source, then the sources it was itself fine-tuned from."""
        entry = {"checkpoint": str(self.path), "step": self.step, "sha256": self.sha256[:12]}
        return [entry, *self.config.get("lineage", [])]


def load_init_source(path: str | Path) -> tuple[InitSource, dict[str, torch.Tensor]]:
    """The checkpoint ``trainer.init_from`` names and its weights (``weights_only`` load);
    a missing or unreadable file is a CheckpointError naming the key."""
    path = Path(path)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"trainer.init_from: {e}") from e
    spm_model = spm_tensor_to_bytes(checkpoint["spm_model"])
    try:
        Tokenizer(spm_model)
    except RuntimeError as e:  # SentencePiece's error for bytes that are not a model
        raise CheckpointError(
            f"trainer.init_from: {path}: spm_model is not a SentencePiece model: {e}"
        ) from e
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest needs 3.11
            digest.update(chunk)
    source = InitSource(
        path=path.resolve(),
        step=int(checkpoint["step"]),
        sha256=digest.hexdigest(),
        config=checkpoint["config"],
        spm_model=spm_model,
    )
    return source, checkpoint["model"]


def checkpoint_tokenizer(cfg: DictConfig, source: InitSource | None = None) -> bytes | None:
    """The SentencePiece model data preparation reuses: with
    ``data.tokenizer.from_checkpoint=true`` that of ``trainer.init_from`` (read from
    ``source`` when given), else None (preparation trains one)."""
    if not OmegaConf.select(cfg, "data.tokenizer.from_checkpoint", default=False):
        return None
    if source is None:
        source, _ = load_init_source(cfg.trainer.init_from)
    return source.spm_model


def check_architecture(source: InitSource, model_cfg: dict[str, Any]) -> None:
    """Every ``model`` key but :data:`FREE_KEYS` must equal the source's; a key one of the two
    configs lacks (an older checkpoint) counts as the model's default."""
    theirs_cfg, ours_cfg = with_defaults(source.config["model"]), with_defaults(model_cfg)
    for key in sorted((set(theirs_cfg) | set(ours_cfg)) - FREE_KEYS):
        ours, theirs = ours_cfg.get(key, _UNSET), theirs_cfg.get(key, _UNSET)
        if ours != theirs:
            ours_text = f"model.{key}=" + ("(unset)" if ours is _UNSET else str(ours))
            theirs_text = "no such key" if theirs is _UNSET else str(theirs)
            raise ConfigError(
                f"{ours_text} but {source.path} has {theirs_text}: trainer.init_from needs the "
                "same architecture (only model.dropout and model.attention_dropout may differ)"
            )


def check_vocabulary(source: InitSource, tokenizer: Tokenizer) -> None:
    """The run's SentencePiece model must be the source's, byte for byte (sha256)."""
    ours = hashlib.sha256(tokenizer.model_bytes).hexdigest()
    if ours == hashlib.sha256(source.spm_model).hexdigest():
        return
    n_theirs, n_ours = Tokenizer(source.spm_model).vocab_size, tokenizer.vocab_size
    other = " different" if n_theirs == n_ours else ""
    raise ConfigError(
        f"vocabulary: {source.path} has {n_theirs} pieces, this run's SentencePiece model has "
        f"{n_ours}{other} ones; set data.tokenizer.from_checkpoint=true to prepare the data "
        "with the checkpoint's SentencePiece model"
    )


def initialise_from(
    model: Transformer,
    source: InitSource,
    weights: dict[str, torch.Tensor],
    model_cfg: dict[str, Any],
    tokenizer: Tokenizer,
) -> None:
    """Check that ``source`` fits this run (architecture, vocabulary), then copy its weights
    into ``model``."""
    check_architecture(source, model_cfg)
    check_vocabulary(source, tokenizer)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # a model that is not the one its config describes
        raise CheckpointError(f"trainer.init_from: cannot load {source.path}: {e}") from e


__all__ = [
    "FREE_KEYS",
    "InitSource",
    "check_architecture",
    "check_vocabulary",
    "checkpoint_tokenizer",
    "initialise_from",
    "load_init_source",
]
