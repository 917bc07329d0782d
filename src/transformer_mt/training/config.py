"""Checks on a training config that run before any work; every message names the key.

Unknown keys are refused earlier, by Hydra's struct mode, when the command line is parsed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from transformer_mt.data.directions import ROLES, corpora, is_multilingual, language_pairs
from transformer_mt.decoding.search import is_length_penalty
from transformer_mt.errors import ConfigError
from transformer_mt.model.variants import VARIANTS, check_rope_head_size, check_variant
from transformer_mt.training.precision import check_precision
from transformer_mt.training.schedule import check_schedule

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


def _integer(cfg: DictConfig, key: str, allow_null: bool = False) -> int | None:
    """The value of integer ``key`` (a count, a size, a seed); a fraction such as 2.5 is a
    ConfigError that names the key, not a TypeError hours later where it is used."""
    value = _number(cfg, key, allow_null)
    if value is not None and not isinstance(value, int):
        raise ConfigError(
            f"{key} must be a whole number{' or null' if allow_null else ''} (written "
            f"without a point or exponent), got {value}"
        )
    return value


def _positive(
    cfg: DictConfig, key: str, allow_null: bool = False, integer: bool = False
) -> tuple[bool, str]:
    value = (_integer if integer else _number)(cfg, key, allow_null)
    ok = value is None or value > 0
    return ok, f"{key} must be positive{' or null' if allow_null else ''}, got {value}"


def check_optimizer(cfg: DictConfig) -> None:
    """``optim.betas`` is two numbers in [0, 1), ``optim.eps`` > 0, ``optim.weight_decay`` ≥ 0
    (torch would raise a bare ValueError or IndexError for each)."""
    betas = OmegaConf.select(cfg, "optim.betas")
    values = list(betas) if isinstance(betas, (ListConfig, list)) else []
    if len(values) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in values):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas}")
    eps, weight_decay = _number(cfg, "optim.eps"), _number(cfg, "optim.weight_decay")
    if not eps > 0:
        raise ConfigError(f"optim.eps must be positive, got {eps}")
    if not weight_decay >= 0:
        raise ConfigError(f"optim.weight_decay must be ≥ 0, got {weight_decay}")


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


def validate_config(cfg: DictConfig, device: torch.device, world_size: int = 1) -> None:
    """Raise ConfigError for settings that cannot train on ``device`` in a job of
    ``world_size`` processes; the message names the key. Every numeric value is read through
    ``_number`` (or ``_integer`` for counts), which checks its type first."""
    t = cfg.trainer
    num, whole = partial(_number, cfg), partial(_integer, cfg)
    count = partial(_positive, cfg, integer=True)
    average_last = whole("trainer.average_last", allow_null=True)
    keep_last = whole("trainer.keep_last")
    keep_best, clip_norm = whole("trainer.keep_best"), num("trainer.clip_norm")
    label_smoothing = num("trainer.label_smoothing")
    d_model, n_heads = whole("model.d_model"), whole("model.n_heads")
    max_len, max_positions = whole("data.filter.max_len"), whole("model.max_positions")
    tagged = int(is_multilingual(cfg.data))  # a multilingual source leads with its tag
    room = "BOS/EOS and data.pairs' language tag" if tagged else "BOS/EOS"
    seed = whole("seed")
    check_final_alpha(t.final_alpha)
    check_optimizer(cfg)
    checks = [
        _positive(cfg, "optim.lr"),
        count("optim.warmup_steps"),
        count("trainer.max_tokens"),
        count("trainer.max_epochs"),
        count("trainer.max_steps", allow_null=True),
        _positive(cfg, "trainer.max_minutes", allow_null=True),
        count("trainer.update_freq"),
        count("trainer.log_every"),
        count("trainer.save_every_steps", allow_null=True),
        count("trainer.validate_every_steps", allow_null=True),
        count("trainer.patience", allow_null=True),
        count("trainer.keep_last"),
        count("trainer.valid_max_sentences", allow_null=True),
        (seed >= 0, f"seed must be ≥ 0, got {seed}"),
        (
            average_last is None or average_last >= 2,
            f"trainer.average_last must be ≥ 2 or null, got {average_last}",
        ),
        (
            average_last is None or average_last <= keep_last,
            f"trainer.average_last={average_last} needs trainer.keep_last ≥ it "
            f"(keep_last={keep_last})",
        ),
        count("trainer.max_nonfinite_updates"),
        count("trainer.final_beam_size"),
        count("trainer.final_workers"),
        (
            device.type == "cpu" or t.final_workers == 1,
            f"trainer.final_workers={t.final_workers} is for CPUs; on {device.type} the final "
            "evaluation decodes in one process (set it to 1)",
        ),
        (
            world_size == 1 or t.final_workers == 1,
            f"trainer.final_workers={t.final_workers} is for one process: under DDP the "
            "ranks share the final evaluation's sentences (set it to 1)",
        ),
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
            max_len + tagged < max_positions,
            f"data.filter.max_len={max_len} must be below model.max_positions={max_positions}"
            f"{' - 1' if tagged else ''} (room for {room})",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_schedule(  # after optim.lr and optim.warmup_steps are known to be positive
        str(OmegaConf.select(cfg, "optim.schedule")),
        _integer(cfg, "optim.warmup_steps"),
        _integer(cfg, "optim.decay_steps", allow_null=True),
        _number(cfg, "optim.min_lr"),
        _number(cfg, "optim.lr"),
    )
    check_model_variants(cfg, int(d_model), int(n_heads))
    check_precision(t.precision, device)
    check_resume(str(t.resume))
    check_init_from(cfg)
    check_data(cfg)


def check_model_variants(cfg: DictConfig, d_model: int, n_heads: int) -> None:
    """``model.positions``, ``model.norm`` and ``model.activation`` name known variants (a
    missing key is the model's default); rope needs an even head size."""
    for key in VARIANTS:
        value = OmegaConf.select(cfg, f"model.{key}")
        if value is not None:
            check_variant(key, value)
    if OmegaConf.select(cfg, "model.positions") == "rope":
        check_rope_head_size(d_model, n_heads)


def check_resume(resume: str) -> None:
    """``trainer.resume`` is auto, never, or the path of an existing checkpoint file."""
    if resume not in RESUME_MODES and not Path(resume).is_file():
        raise ConfigError(f"trainer.resume={resume}: no such checkpoint file (or use auto | never)")


def check_init_from(cfg: DictConfig) -> None:
    """``trainer.init_from`` is null or an existing checkpoint file, and not combined with
    ``trainer.resume=PATH`` (both would say where the run starts)."""
    init_from = OmegaConf.select(cfg, "trainer.init_from")
    if init_from is None:
        return
    if not Path(str(init_from)).is_file():
        raise ConfigError(f"trainer.init_from={init_from}: no such checkpoint file")
    resume = str(OmegaConf.select(cfg, "trainer.resume"))
    if resume not in RESUME_MODES:
        raise ConfigError(
            f"trainer.init_from={init_from} and trainer.resume={resume} both name a checkpoint "
            "to start from: init_from starts a new run from its weights, resume=PATH continues "
            "its training; set one of them"
        )


def check_tokenizer_source(cfg: DictConfig) -> None:
    """``data.tokenizer.from_checkpoint`` is a bool; true needs ``trainer.init_from`` (the
    checkpoint whose SentencePiece model preparation reuses)."""
    from_checkpoint = OmegaConf.select(cfg, "data.tokenizer.from_checkpoint", default=False)
    if not isinstance(from_checkpoint, bool):
        raise ConfigError(
            f"data.tokenizer.from_checkpoint must be true or false, got {from_checkpoint!r}"
        )
    init_from = OmegaConf.select(cfg, "trainer.init_from")
    if from_checkpoint and init_from is None:
        raise ConfigError(
            "data.tokenizer.from_checkpoint=true reuses the SentencePiece model of "
            "trainer.init_from, which is null: set trainer.init_from=CKPT"
        )
    if from_checkpoint and not Path(str(init_from)).is_file():
        raise ConfigError(f"trainer.init_from={init_from}: no such checkpoint file")


def check_data(cfg: DictConfig) -> None:
    """The ``data`` keys of preparation (also checked by tmt-prepare), and the corpus files."""
    checks = [
        _positive(cfg, "data.max_train_pairs", allow_null=True, integer=True),
        _positive(cfg, "data.num_workers", allow_null=True, integer=True),
        _positive(cfg, "data.tokenizer.vocab_size", integer=True),
        _positive(cfg, "data.filter.max_len", integer=True),
        _positive(cfg, "data.filter.max_ratio"),
    ]
    sample = _integer(cfg, "data.tokenizer.sample_sentences")
    checks.append((sample >= 2, f"data.tokenizer.sample_sentences must be ≥ 2, got {sample}"))
    _integer(cfg, "data.tokenizer.seed")
    check_tokenizer_source(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    language_pairs(cfg.data)  # data.pairs, when given, names every direction
    if cfg.data.src_lang == cfg.data.tgt_lang and not is_multilingual(cfg.data):
        raise ConfigError(f"data.src_lang and data.tgt_lang are both '{cfg.data.src_lang}'")
    check_corpora(cfg.data)


def check_corpora(data_cfg: DictConfig) -> None:
    """Every corpus file the config names exists. Files a preset fetches into
    ``data.raw_dir`` may instead be in ``data.shared_dir``, and are left to the download
    (which then fails naming the URL) when only ``data.url`` can provide them."""
    raw_dir = Path(data_cfg.raw_dir) if data_cfg.get("raw_dir") else None
    shared_dir = Path(data_cfg.shared_dir) if data_cfg.get("shared_dir") else None
    for role in ROLES:
        for corpus in corpora(data_cfg, role):
            fetched = raw_dir is not None and corpus.prefix.parent == raw_dir
            if fetched and data_cfg.get("url") and not (shared_dir and shared_dir.is_dir()):
                continue
            for key in ("src_lang", "tgt_lang"):
                lang = getattr(corpus, key)
                here = corpus.side(lang)
                shared = shared_dir / f"{corpus.name}.{lang}.gz" if shared_dir else None
                if here.is_file() or (fetched and shared is not None and shared.is_file()):
                    continue
                where = f" or {shared}" if fetched and shared is not None else ""
                plain = here.with_suffix("") if here.suffix == ".gz" else here
                named = (
                    f"data.pairs ({corpus.src_lang}-{corpus.tgt_lang})"
                    if corpus.tag is not None
                    else f"data.{key}={lang}"
                )
                raise ConfigError(
                    f"{named}: data.{role} names {corpus.prefix}, but "
                    f"{plain} does not exist (nor {plain}.gz){where}"
                )
