"""``pilot run`` end to end: real Redis, SuperLink, SuperNodes, ClientApp processes, evaluator worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pilot.checkpoint.rundir import checkpoints_dir, list_checkpoints
from pilot.eventlog import event_log_path, read_event_log

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_text(shakespeare_prefix) -> Path:
    return shakespeare_prefix(150_000)


def test_pilot_run_two_trainers_two_rounds(small_text: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "pilot.cli", "run", "--trainers", "2", "--data", str(small_text), "--preset", "d1",
        "--rounds", "2", "--round-steps", "4", "--device", "cpu", "--out", str(run_dir), "--run-id", "e2e-run",
        "--run-config", "seq-len=32 batch-size=4 eval-tokens=2048 reply-grace-s=240.0 trainer-wait-s=120.0",
        "--timeout", "500",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert [r for r, _ in list_checkpoints(checkpoints_dir(run_dir))] == [0, 1, 2]
    records = read_event_log(event_log_path(run_dir))
    control = [r["type"] for r in records if r["stream"] == "control"]
    assert control[0] == "RunStarted" and "RunStopped" in control
    order = [t for t in control if t in ("RoundStarted", "RoundClosed")]
    assert order == ["RoundStarted", "RoundClosed", "RoundStarted", "RoundClosed"]
    evaluated = sorted(r["event"]["round"] if "round" in r["event"] else 0
                       for r in records if r["type"] == "EvalCompleted")
    assert evaluated == [0, 1, 2]
    assert (run_dir / "report.md").is_file()
    assert "val BPB" in completed.stdout
    progress = [r for r in records if r["type"] == "TrainerProgress"]
    assert {r["event"]["trainer_id"] for r in progress} <= {"trainer-0", "trainer-1"}
    closed = [r["event"] for r in records if r["type"] == "RoundClosed"]
    assert all(int(c.get("valid_updates", 0)) == 2 for c in closed), json.dumps(closed)
