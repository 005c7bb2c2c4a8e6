"""The shakespeare task through real Flower processes: ``pilot run --task shakespeare`` and ``flwr run`` simulation.

Both are ``slow`` (about 80 s and 60+ s on 2 cores, mostly process and Ray
start-up); tests/integration/test_shakespeare_task.py runs the same task logic
in CI in ~20 s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pilot.bus import redis_client
from pilot.checkpoint.rundir import checkpoints_dir, list_checkpoints
from pilot.eventlog import event_log_path, read_event_log
from pilot.flower import LocalFederation
from pilot.launcher import APP_DIR
from pilot.redis_server import EmbeddedRedis
from services.evaluator.results import ResultStore

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _val_losses(run_dir: Path) -> dict[int, float]:
    records = read_event_log(event_log_path(run_dir))
    return {int(r["event"].get("round", 0)): float(r["event"]["val_loss"])
            for r in records if r["type"] == "EvalCompleted" and r["event"].get("status") == "EVAL_STATUS_OK"}


def test_pilot_run_task_shakespeare_two_trainers_two_rounds(shakespeare_path: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "pilot.cli", "run", "--task", "shakespeare", "--trainers", "2", "--rounds", "2",
        "--round-steps", "6", "--data", str(shakespeare_path), "--preset", "d1", "--device", "cpu",
        "--out", str(run_dir), "--run-id", "e2e-shakespeare",
        "--run-config", "batch-size=8 seq-len=64 reply-grace-s=240.0 trainer-wait-s=120.0", "--timeout", "500",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert not (run_dir / "logs" / "evaluator.log").exists()  # eval-inline: no Celery worker started
    losses = _val_losses(run_dir)
    assert sorted(losses) == [0, 1, 2] and losses[2] < losses[0], losses
    report = (run_dir / "report.md").read_text()
    assert "| Round | Train Loss | Val Loss | Perplexity |" in report and "prompt: `'\\n'`" in report
    assert "perplexity" in completed.stdout
    records = read_event_log(event_log_path(run_dir))
    closed = [r["event"] for r in records if r["type"] == "RoundClosed"]
    assert all(int(c.get("valid_updates", 0)) == 2 for c in closed)


def test_flwr_simulation_task_shakespeare_evaluates_inline(shakespeare_path: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with LocalFederation(APP_DIR, 0, log_dir=tmp_path / "logs", simulation=True) as federation:
        run = federation.submit(
            {"task": "shakespeare", "run-id": "sim-shakespeare", "data": str(shakespeare_path), "out": str(run_dir),
             "preset": "d1", "seq-len": 64, "batch-size": 8, "num-server-rounds": 2, "max-steps": 4,
             "min-trainers": 2, "device": "cpu"},
            federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1},
        )
        status = federation.wait(run, timeout=600)
    assert status.succeeded, status.details
    assert [r for r, _ in list_checkpoints(checkpoints_dir(run_dir))] == [0, 1, 2]
    # no Celery worker ran: the coordinator evaluated every round itself, into its embedded Redis (AOF)
    with EmbeddedRedis(run_dir / "redis") as server:
        results = ResultStore(redis_client(server.url), "sim-shakespeare").all()
    assert [r.round for r in results] == [0, 1, 2] and all(r.ok and r.loss for r in results)
    assert results[2].loss < results[0].loss and len(results[2].sample) >= 200
