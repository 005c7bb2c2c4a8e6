"""Shared pytest fixtures: where the shared real-text data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repo (Tiny Shakespeare, WikiText-2)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; tests need ../shared/data beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare_path(shared_data: Path) -> Path:
    return shared_data / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session", autouse=True)
def isolated_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session writes under its own PILOT_BASE_DIR, never ~/.cache/pilot."""
    base = tmp_path_factory.mktemp("pilot-base")
    os.environ["PILOT_BASE_DIR"] = str(base)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return base
