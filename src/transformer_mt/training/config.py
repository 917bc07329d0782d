"""Checks on a training config that run before any work; every message names the key.

Unknown keys are refused earlier, by Hydra's struct mode, when the command line is parsed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from transformer_mt.data.corpus import corpus_file
from transformer_mt.data.dataset import split_names
from transformer_mt.decoding.search import is_length_penalty
from transformer_mt.errors import ConfigError
from transformer_mt.training.precision import check_precision

RESUME_MODES = ("auto", "never")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(cfg: DictConfig, key: str, allow_null: bool = False) -> float | None:
    """The value of numeric ``key``; text, a bool or a disallowed null is a ConfigError that
    names the key (instead of failing a comparison later)."""
    value = OmegaConf.select(cfg, key)
    if value is None and allow_null:
        return None
    if not _is_number(value):
        raise ConfigError(
            f"{key} must be a number{' or null' if allow_null else ''}, got {value!r}"
        )
    return value


def _positive(cfg: DictConfig, key: str, allow_null: bool = False) -> tuple[bool, str]:
    value = _number(cfg, key, allow_null)
    ok = value is None or value > 0
    return ok, f"{key} must be positive{' or null' if allow_null else ''}, got {value}"


def check_final_alpha(alpha: object) -> None:
    """``trainer.final_alpha`` is a finite number ≥ 0 or a non-empty list of them."""
    alphas = list(alpha) if isinstance(alpha, (ListConfig, list)) else [alpha]
    if not alphas or not all(is_length_penalty(a) for a in alphas):
        raise ConfigError(
            "trainer.final_alpha must be a finite number ≥ 0 (0 = off) or a non-empty list of "
            f"them (tuned on val), got {alpha}"
        )


def final_alphas(value: float | ListConfig | list[float]) -> list[float]:
    """``trainer.final_alpha`` as a list: one α, or the grid to tune on val."""
    if isinstance(value, (ListConfig, list)):
        return [float(a) for a in value]
    return [float(value)]


def validate_config(cfg: DictConfig, device: torch.device) -> None:
    """Raise ConfigError for settings that cannot train; the message names the key. Every
    numeric value is read through ``_number``, which checks its type first."""
    t, d = cfg.trainer, cfg.data
    num = partial(_number, cfg)
    average_last = num("trainer.average_last", allow_null=True)
    keep_last = num("trainer.keep_last")
    keep_best, clip_norm = num("trainer.keep_best"), num("trainer.clip_norm")
    label_smoothing = num("trainer.label_smoothing")
    d_model, n_heads = num("model.d_model"), num("model.n_heads")
    max_len, max_positions = num("data.filter.max_len"), num("model.max_positions")
    check_final_alpha(t.final_alpha)
    checks = [
        _positive(cfg, "optim.lr"),
        _positive(cfg, "optim.warmup_steps"),
        _positive(cfg, "trainer.max_tokens"),
        _positive(cfg, "trainer.max_epochs"),
        _positive(cfg, "trainer.max_steps", allow_null=True),
        _positive(cfg, "trainer.max_minutes", allow_null=True),
        _positive(cfg, "trainer.update_freq"),
        _positive(cfg, "trainer.log_every"),
        _positive(cfg, "trainer.save_every_steps", allow_null=True),
        _positive(cfg, "trainer.validate_every_steps", allow_null=True),
        _positive(cfg, "trainer.patience", allow_null=True),
        _positive(cfg, "trainer.keep_last"),
        (
            average_last is None or average_last >= 2,
            f"trainer.average_last must be ≥ 2 or null, got {average_last}",
        ),
        (
            average_last is None or average_last <= keep_last,
            f"trainer.average_last={average_last} needs trainer.keep_last ≥ it "
            f"(keep_last={keep_last})",
        ),
        _positive(cfg, "trainer.max_nonfinite_updates"),
        _positive(cfg, "trainer.final_beam_size"),
        (keep_best >= 0, f"trainer.keep_best must be ≥ 0, got {keep_best}"),
        (clip_norm >= 0, f"trainer.clip_norm must be ≥ 0 (0 = off), got {clip_norm}"),
        (
            0 <= label_smoothing < 1,
            f"trainer.label_smoothing must be in [0, 1), got {label_smoothing}",
        ),
        (
            d_model % n_heads == 0,
            f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}",
        ),
        (
            max_len < max_positions,
            f"data.filter.max_len={max_len} must be below "
            f"model.max_positions={max_positions} (room for BOS/EOS)",
        ),
        (d.src_lang != d.tgt_lang, f"data.src_lang and data.tgt_lang are both '{d.src_lang}'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_precision(t.precision, device)
    check_resume(str(t.resume))
    check_languages(d)


def check_resume(resume: str) -> None:
    """``trainer.resume`` is auto, never, or the path of an existing checkpoint file."""
    if resume not in RESUME_MODES and not Path(resume).is_file():
        raise ConfigError(f"trainer.resume={resume}: no such checkpoint file (or use auto | never)")


def check_languages(data_cfg: DictConfig) -> None:
    """Each language must have its corpus files locally or in the shared copy. When there is
    no shared copy and a URL is set, the check is left to the download (which then fails
    naming the URL)."""
    shared_dir = Path(data_cfg.shared_dir) if data_cfg.shared_dir else None
    if data_cfg.url and not (shared_dir and shared_dir.is_dir()):
        return
    for key in ("src_lang", "tgt_lang"):
        lang = data_cfg[key]
        for split in split_names(data_cfg).values():
            here = corpus_file(data_cfg.raw_dir, split, lang)
            shared = corpus_file(shared_dir, split, lang) if shared_dir else None
            if not here.is_file() and not (shared is not None and shared.is_file()):
                where = data_cfg.raw_dir + (f" or {shared_dir}" if shared_dir else "")
                raise ConfigError(f"data.{key}={lang}: the corpus has no {here.name} in {where}")
