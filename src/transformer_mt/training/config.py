"""Checks on a training config that run before any work; every message names the key.

Unknown keys are refused earlier, by Hydra's struct mode, when the command line is parsed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from transformer_mt.data.corpus import corpus_file
from transformer_mt.data.dataset import split_names
from transformer_mt.errors import ConfigError
from transformer_mt.training.precision import check_precision

RESUME_MODES = ("auto", "never")

# Keys that must hold a number (null where the key's comment allows it); checked first, so that
# a text value is named in the error rather than failing a comparison later.
NUMERIC_KEYS = (
    "optim.lr",
    "optim.warmup_steps",
    "trainer.max_tokens",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.update_freq",
    "trainer.log_every",
    "trainer.save_every_steps",
    "trainer.validate_every_steps",
    "trainer.patience",
    "trainer.keep_last",
    "trainer.keep_best",
    "trainer.average_last",
    "trainer.max_nonfinite_updates",
    "trainer.final_beam_size",
    "trainer.clip_norm",
    "trainer.label_smoothing",
    "model.d_model",
    "model.n_heads",
    "model.max_positions",
    "data.filter.max_len",
)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_numbers(cfg: DictConfig) -> None:
    """Each of ``NUMERIC_KEYS`` holds a number or null (whether null is allowed is checked
    after, per key), and ``trainer.final_alpha`` a number ≥ 0 or a non-empty list of them."""
    for key in NUMERIC_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not _is_number(value):
            raise ConfigError(f"{key} must be a number, got {value!r}")
    alpha = cfg.trainer.final_alpha
    alphas = list(alpha) if isinstance(alpha, (ListConfig, list)) else [alpha]
    if not alphas or not all(_is_number(a) and a >= 0 for a in alphas):
        raise ConfigError(
            "trainer.final_alpha must be a number ≥ 0 (0 = off) or a non-empty list of them "
            f"(tuned on val), got {alpha}"
        )


def final_alphas(value: float | ListConfig | list[float]) -> list[float]:
    """``trainer.final_alpha`` as a list: one α, or the grid to tune on val."""
    if isinstance(value, (ListConfig, list)):
        return [float(a) for a in value]
    return [float(value)]


def _positive(value: float | None, key: str, allow_null: bool = False) -> tuple[bool, str]:
    ok = (allow_null and value is None) or (value is not None and value > 0)
    return ok, f"{key} must be positive{' or null' if allow_null else ''}, got {value}"


def validate_config(cfg: DictConfig, device: torch.device) -> None:
    """Raise ConfigError for settings that cannot train; the message names the key."""
    check_numbers(cfg)
    t, o, m, d = cfg.trainer, cfg.optim, cfg.model, cfg.data
    checks = [
        _positive(o.lr, "optim.lr"),
        _positive(o.warmup_steps, "optim.warmup_steps"),
        _positive(t.max_tokens, "trainer.max_tokens"),
        _positive(t.max_epochs, "trainer.max_epochs"),
        _positive(t.max_steps, "trainer.max_steps", allow_null=True),
        _positive(t.update_freq, "trainer.update_freq"),
        _positive(t.log_every, "trainer.log_every"),
        _positive(t.save_every_steps, "trainer.save_every_steps", allow_null=True),
        _positive(t.validate_every_steps, "trainer.validate_every_steps", allow_null=True),
        _positive(t.patience, "trainer.patience", allow_null=True),
        _positive(t.keep_last, "trainer.keep_last"),
        (
            t.average_last is None or t.average_last >= 2,
            f"trainer.average_last must be ≥ 2 or null, got {t.average_last}",
        ),
        (
            t.average_last is None or t.average_last <= t.keep_last,
            f"trainer.average_last={t.average_last} needs trainer.keep_last ≥ it "
            f"(keep_last={t.keep_last})",
        ),
        _positive(t.max_nonfinite_updates, "trainer.max_nonfinite_updates"),
        _positive(t.final_beam_size, "trainer.final_beam_size"),
        (t.keep_best >= 0, f"trainer.keep_best must be ≥ 0, got {t.keep_best}"),
        (t.clip_norm >= 0, f"trainer.clip_norm must be ≥ 0 (0 = off), got {t.clip_norm}"),
        (
            0 <= t.label_smoothing < 1,
            f"trainer.label_smoothing must be in [0, 1), got {t.label_smoothing}",
        ),
        (
            m.d_model % m.n_heads == 0,
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}",
        ),
        (
            d.filter.max_len < m.max_positions,
            f"data.filter.max_len={d.filter.max_len} must be below "
            f"model.max_positions={m.max_positions} (room for BOS/EOS)",
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
