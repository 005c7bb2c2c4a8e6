"""Shared pytest fixtures: where the shared real-text data lives."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def shakespeare_prefix(tmp_path_factory: pytest.TempPathFactory, shakespeare_path: Path) -> Callable[[int], Path]:
    """``make(chars)``: a text file holding Tiny Shakespeare's first ``chars`` characters (one per size)."""
    text = shakespeare_path.read_text()
    made: dict[int, Path] = {}

    def make(chars: int) -> Path:
        if chars not in made:
            made[chars] = tmp_path_factory.mktemp("text") / f"shakespeare_{chars}.txt"
            made[chars].write_text(text[:chars])
        return made[chars]

    return make


@pytest.fixture(scope="session", autouse=True)
def isolated_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session writes under its own PILOT_BASE_DIR, never ~/.cache/pilot."""
    base = tmp_path_factory.mktemp("pilot-base")
    os.environ["PILOT_BASE_DIR"] = str(base)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return base


def _docker_compose_available() -> bool:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            probe = subprocess.run([*command, "version"], capture_output=True, check=False, timeout=30)
            if probe.returncode == 0:
                return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of hardware or tools this machine lacks (a GPU, docker compose) are deselected, not skipped:
    they check the same code on machines that have them, and never hide a missing feature here."""
    wanted = {item.get_closest_marker(name) and name for item in items for name in ("gpu", "docker")} - {None}
    unavailable: set[str] = set()
    if "gpu" in wanted:
        import torch

        if not torch.cuda.is_available():
            unavailable.add("gpu")
    if "docker" in wanted and not _docker_compose_available():
        unavailable.add("docker")
    if not unavailable:
        return
    keep = [item for item in items if not any(item.get_closest_marker(name) for name in unavailable)]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
