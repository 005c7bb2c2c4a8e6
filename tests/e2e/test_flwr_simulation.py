"""``flwr run`` with Flower's simulation engine (Ray): the same app, run-config overrides, no Pilot launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilot.checkpoint.rundir import checkpoints_dir, list_checkpoints
from pilot.flower import LocalFederation
from pilot.launcher import APP_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # Ray start-up alone is ~30 s on 2 cores


def test_flwr_simulation_runs_the_app(tmp_path: Path, shakespeare_path: Path) -> None:
    text = tmp_path / "small.txt"
    text.write_text(shakespeare_path.read_text()[:100_000])
    run_dir = tmp_path / "run"
    with LocalFederation(APP_DIR, 0, log_dir=tmp_path / "logs", simulation=True) as federation:
        run = federation.submit(
            {"run-id": "sim", "data": str(text), "out": str(run_dir), "preset": "d1", "seq-len": 32,
             "batch-size": 4, "rounds": 2, "round-steps": 2, "min-trainers": 2, "evaluate": False,
             "device": "cpu", "num-server-rounds": 2},
            federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1},
        )
        status = federation.wait(run, timeout=600)
    assert status.succeeded, status.details
    assert [r for r, _ in list_checkpoints(checkpoints_dir(run_dir))] == [0, 1, 2]
