"""Where Pilot keeps its files.

Everything Pilot stores lives under one base directory, ``$PILOT_BASE_DIR``
(default ``~/.cache/pilot``), with one sub-directory per concern:

- ``data/``       parquet shards (FineWeb-EDU layout) and imported text
- ``tokenizer/``  tokenizer artifacts
- ``runs/<id>/``  checkpoints, event log and report of one run

Each part can be overridden by its own flag; these helpers only supply defaults
and never depend on the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR_ENV = "PILOT_BASE_DIR"


def base_dir() -> Path:
    """The base directory, from ``$PILOT_BASE_DIR`` or ``~/.cache/pilot``."""
    configured = os.environ.get(BASE_DIR_ENV)
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "pilot"
    return root.resolve()


def data_dir() -> Path:
    return base_dir() / "data"


def tokenizer_dir() -> Path:
    return base_dir() / "tokenizer"


def runs_dir() -> Path:
    return base_dir() / "runs"


def run_dir(run_id: str) -> Path:
    return runs_dir() / run_id
