"""Helpers shared by the console scripts: where the configs live, and clean error exits."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from transformer_mt.data.corpus import CorpusError
from transformer_mt.training.checkpoint import CheckpointError

F = TypeVar("F", bound=Callable[..., Any])

# Errors caused by the user's input: print one clear line and exit 1, no traceback.
USER_ERRORS = (CorpusError, CheckpointError, ValueError, FileNotFoundError)


def config_dir() -> str:
    """Absolute path of the Hydra config tree (``$TMT_CONFIG_DIR`` or the repo's ``configs/``)."""
    return os.environ.get("TMT_CONFIG_DIR") or str(Path(__file__).resolve().parents[3] / "configs")


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
