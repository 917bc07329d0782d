"""Errors caused by what the user gave us: the console scripts print them in one line and exit 1."""

from __future__ import annotations


class UserError(Exception):
    """Base class: bad input named in the message (a file, line, config key or flag)."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the key."""


class CorpusError(UserError):
    """A corpus file is missing, unreadable, not UTF-8, or misaligned with its pair."""


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, or not one of ours."""


class TrainingDivergedError(UserError):
    """Too many consecutive non-finite updates; the message names the last good checkpoint."""


class ResultsError(UserError):
    """A run's results.json is unreadable or not in the expected shape; the message names it."""
