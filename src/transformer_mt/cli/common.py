"""Helpers shared by the console scripts: where the configs live, and clean error exits."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from transformer_mt.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

# Errors caused by the user's input or environment: one clear line and exit 1, no traceback.
USER_ERRORS = (UserError, OSError)


def config_dir() -> str:
    """Absolute path of the Hydra config tree (``$TMT_CONFIG_DIR`` or the repo's ``configs/``)."""
    return os.environ.get("TMT_CONFIG_DIR") or str(Path(__file__).resolve().parents[3] / "configs")


def run_name(overrides: str) -> str:
    """A directory name from Hydra's ``override_dirname``: "default" when empty, slashes
    replaced, long ones shortened with a hash so distinct commands keep distinct names."""
    name = overrides.replace("/", "_") or "default"
    if len(name) > 150:
        name = f"{name[:120]}_{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def register_resolvers() -> None:
    """The config resolvers our YAML uses: ``${tmt.run_name:...}``."""
    if not OmegaConf.has_resolver("tmt.run_name"):
        OmegaConf.register_new_resolver("tmt.run_name", run_name)


def exit_on_user_error(fn: F) -> F:
    """Turn the errors in USER_ERRORS into ``error: <message>`` on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def decoding_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the checkpoint and the decoding flags tmt-translate and
    tmt-evaluate share: --beam N | --greedy, --alpha, --batch-size, --device."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by tmt-train")
    search = p.add_mutually_exclusive_group()
    search.add_argument("--beam", type=int, default=5, help="beam size (default 5); 1 = greedy")
    search.add_argument("--greedy", action="store_true", help="greedy search (same as --beam 1)")
    p.add_argument("--alpha", type=float, default=0.6, help="length penalty α (default 0.6)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per decoding batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    return p


def parse_decoding_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; validates the decoding flags and folds --greedy into ``beam=1``."""
    args = p.parse_args(argv)
    if args.beam < 1:
        p.error("--beam must be ≥ 1")
    if args.batch_size < 1:
        p.error("--batch-size must be ≥ 1")
    if args.greedy:
        args.beam = 1
    return args
