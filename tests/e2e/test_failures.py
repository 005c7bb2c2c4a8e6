"""Failures through the real Flower stack: a trainer killed mid-round, the coordinator killed and restarted."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pilot.bus import Bus, redis_client
from pilot.checkpoint.rundir import checkpoints_dir, list_checkpoints
from pilot.flower import LocalFederation
from pilot.keys import Stream
from pilot.launcher import APP_DIR, flower_values
from pilot.redis_server import EmbeddedRedis
from pilot.run_config import run_config_from
from pilot.v1 import events_pb2 as ev

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_text(shakespeare_prefix) -> Path:
    return shakespeare_prefix(150_000)


def events(bus: Bus) -> list:
    """Control and telemetry events of the run."""
    entries = bus.read_streams({Stream.CONTROL: "0-0", Stream.TELEMETRY: "0-0"}, count=100_000)
    return [e.event for e in entries if e.event is not None]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def run_values(run_id: str, data: Path, out: Path, redis_url: str, **extra: object) -> dict:
    cfg = run_config_from({
        "run-id": run_id, "data": str(data), "out": str(out), "redis-url": redis_url, "preset": "d1",
        "seq-len": 32, "batch-size": 4, "device": "cpu", "evaluate": False, "trainer-wait-s": 120,
        "progress-every-s": 1.0, **extra,
    })
    return flower_values(cfg)


def test_killed_trainer_does_not_stall_and_round_stop_closes_early(shakespeare_path: Path, tmp_path: Path) -> None:
    # the whole text and a d2 model, so no trainer runs out of leasable data before it is killed or stopped
    with EmbeddedRedis(tmp_path / "redis") as redis_server, LocalFederation(
        APP_DIR, 3, log_dir=tmp_path / "logs",
        node_configs=[{"trainer-id": f"t{i}"} for i in range(3)],
        env={"PILOT_REDIS_URL": redis_server.url}, node_env=[{"OMP_NUM_THREADS": "1"}] * 3,
    ) as federation:
        bus = Bus(redis_client(redis_server.url), "e2e-kill")
        values = run_values("e2e-kill", shakespeare_path, tmp_path / "run", redis_server.url, rounds=2,
                            preset="d2", **{"seq-len": 64, "batch-size": 8,
                                            "round-seconds": 25.0, "reply-grace-s": 60.0, "min-trainers": 2,
                               "lease-seconds": 10.0, "early-start-policy": "none"})
        flower_run = federation.submit(values, via="api")
        wait_for(lambda: any(isinstance(e, ev.TrainerProgress) and e.trainer_id == "t2" for e in events(bus)),
                 240, "trainer t2 training in round 1")
        federation.kill_node(2)
        wait_for(lambda: {e.trainer_id for e in events(bus) if isinstance(e, ev.TrainerProgress) and e.round == 2}
                 == {"t0", "t1"}, 300, "t0 and t1 training in round 2")
        stop = subprocess.run([sys.executable, "-m", "pilot.cli", "round", "stop", "--run-dir",
                               str(tmp_path / "run")], capture_output=True, text=True, timeout=60, cwd=REPO)
        status = federation.wait(flower_run, timeout=300)
        all_events = events(bus)
    assert status.succeeded, status.details
    assert stop.returncode == 0, stop.stderr
    started = {e.round: e for e in all_events if isinstance(e, ev.RoundStarted)}
    closed = {e.round: e for e in all_events if isinstance(e, ev.RoundClosed)}
    assert len(started[1].participants) == 3
    assert closed[1].valid_updates == 2 and set(closed[1].trainers) == {"t0", "t1"}
    assert set(closed[2].trainers) == {"t0", "t1"}
    stops = [e for e in all_events if isinstance(e, ev.StopRound)]
    assert [(s.round, s.reason) for s in stops] == [(2, ev.STOP_REASON_OPERATOR)]
    assert closed[2].wall_s < 25.0 + 60.0  # closed by the stop, not by the deadline


def test_restarted_coordinator_resumes_at_the_next_round(small_text: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with EmbeddedRedis(tmp_path / "redis") as redis_server, LocalFederation(
        APP_DIR, 2, log_dir=tmp_path / "logs", node_configs=[{"trainer-id": f"t{i}"} for i in range(2)],
        env={"PILOT_REDIS_URL": redis_server.url}, node_env=[{"OMP_NUM_THREADS": "1"}] * 2,
    ) as federation:
        bus = Bus(redis_client(redis_server.url), "e2e-resume")
        values = run_values("e2e-resume", small_text, run_dir, redis_server.url, rounds=3, outer="diloco",
                            **{"round-steps": 3, "min-trainers": 2, "reply-grace-s": 120.0})
        first = federation.submit(values, via="api")
        wait_for(lambda: any(isinstance(e, ev.RoundClosed) and e.round == 1 for e in events(bus)), 300,
                 "round 1 to close")
        wait_for(lambda: 1 in [r for r, _ in list_checkpoints(checkpoints_dir(run_dir))], 60, "round 1 checkpoint")
        federation.stop_run(first)  # the coordinator dies (its ServerApp process is stopped)
        federation.wait(first, timeout=120)
        round1 = dict(list_checkpoints(checkpoints_dir(run_dir)))[1]
        before = (round1 / "model.safetensors").read_bytes()
        second = federation.submit(values, via="api")
        status = federation.wait(second, timeout=400)
        all_events = events(bus)
    assert status.succeeded, status.details
    started = [e for e in all_events if isinstance(e, ev.RunStarted)]
    assert [s.resumed_from_round for s in started] == [0, 1]
    assert [r for r, _ in list_checkpoints(checkpoints_dir(run_dir))] == [0, 1, 2, 3]
    assert (round1 / "model.safetensors").read_bytes() == before  # round 1 was not redone
    assert [e.round for e in all_events if isinstance(e, ev.RoundClosed)][-2:] == [2, 3]
