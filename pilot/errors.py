"""Typed exceptions shared by every Pilot module.

Library code raises these; entrypoints (CLI, services) turn them into one clear
line and a non-zero exit, or into a recorded failure with the reason. Each
message names the thing that was wrong (the key, path, preset, checksum...).
"""

from __future__ import annotations


class PilotError(Exception):
    """Base class: an error a user can act on, reported without a traceback."""


class ConfigError(PilotError, ValueError):
    """A configuration key is unknown or its value is invalid."""


class DataError(PilotError):
    """Training or validation data is missing, empty or corrupt."""


class TokenizerError(PilotError):
    """A tokenizer cannot be trained, loaded or used as asked."""


class CheckpointError(PilotError):
    """A checkpoint is missing, corrupt, tampered with, or of another model."""


class RetryableError(PilotError):
    """A transient failure (peer down, timeout): the caller may retry."""


class BadUpdate(PilotError):
    """A trainer's reply failed validation (non-finite, wrong shape, norm...)."""
