"""A federated run's round logic end to end: real Redis, ledger, bus, model, codec and checkpoints.

The trainers are the real ClientApp, run in threads behind an in-process Grid;
Flower's SuperLink transport is exercised by the end-to-end tests instead.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import torch

from pilot.bus import Bus
from pilot.checkpoint import latest_checkpoint, load_checkpoint
from pilot.checkpoint.rundir import checkpoints_dir, list_checkpoints
from pilot.ledger import Ledger
from pilot.protocol import UPDATE
from pilot.run_config import run_config_from
from pilot.v1 import events_pb2 as ev
from services.coordinator.server_app import run_coordinator
from tests.integration.inprocess_grid import InProcessGrid


def config(run_id: str, data: Path, out: Path, redis_url: str, **extra: object):
    values: dict[str, object] = {
        "run-id": run_id, "data": str(data), "out": str(out), "redis-url": redis_url, "preset": "d1",
        "seq-len": 32, "batch-size": 4, "rounds": 2, "round-seconds": 60, "round-steps": 3,
        "min-trainers": 2, "evaluate": False, "device": "cpu", "reply-grace-s": 60, "trainer-wait-s": 10,
        "eval-tokens": 1024, "progress-every-s": 0.2,
    }
    values.update(extra)
    return run_config_from(values)


@pytest.fixture(scope="module")
def small_text(shakespeare_prefix) -> Path:
    return shakespeare_prefix(120_000)


def control_events(bus: Bus) -> list:
    return [entry.event for entry in bus.read(count=10_000) if entry.event is not None]


def test_two_trainers_two_rounds(small_text, tmp_path, redis_url, redis_client, run_id):
    cfg = config(run_id, small_text, tmp_path / "run", redis_url)
    grid = InProcessGrid([11, 12])
    assert run_coordinator(grid, cfg) == 2
    rounds = [r for r, _ in list_checkpoints(checkpoints_dir(cfg.run_dir()))]
    assert rounds == [0, 1, 2]
    events = control_events(Bus(redis_client, run_id))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunStopped"
    assert kinds.count("RoundStarted") == 2 and kinds.count("RoundClosed") == 2
    closed = [e for e in events if isinstance(e, ev.RoundClosed)]
    assert [c.round for c in closed] == [1, 2]
    assert all(c.valid_updates == 2 and c.weights_changed for c in closed)
    assert closed[0].tokens == 2 * 3 * 4 * 32  # 2 trainers x 3 steps x B x T (no unit ends mid-step here)
    stats = Ledger(redis_client, run_id).stats()
    assert sum(stats.tokens_by_round.values()) >= closed[0].tokens + closed[1].tokens
    first, second = (load_checkpoint(p).model for _, p in list_checkpoints(checkpoints_dir(cfg.run_dir()))[1:])
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_bad_updates_are_rejected_and_the_round_goes_on(small_text, tmp_path, redis_url, redis_client, run_id):
    cfg = config(run_id, small_text, tmp_path / "run", redis_url, rounds=1)
    grid = InProcessGrid([1, 2, 3])

    def nan_update(reply):
        arrays = reply.content.array_records[UPDATE]
        name = next(iter(arrays))
        tensor = arrays[name].numpy().copy()
        tensor.flat[0] = math.nan
        from flwr.app import Array
        arrays[name] = Array(tensor)
        return reply

    grid.tamper[2] = nan_update
    grid.node_configs[3] = {"device": "no-such-device"}  # this trainer fails outright
    run_coordinator(grid, cfg)
    events = control_events(Bus(redis_client, run_id))
    rejected = {e.trainer_id: e.reason for e in events if isinstance(e, ev.UpdateRejected)}
    assert set(rejected) == {"node-2", "node-3"}
    assert "non-finite" in rejected["node-2"] or "NaN" in rejected["node-2"]
    assert "no-such-device" in rejected["node-3"]
    closed = [e for e in events if isinstance(e, ev.RoundClosed)][0]
    assert closed.valid_updates == 1 and closed.rejected_updates == 2 and closed.weights_changed


def test_no_valid_reply_keeps_the_weights(small_text, tmp_path, redis_url, redis_client, run_id):
    cfg = config(run_id, small_text, tmp_path / "run", redis_url, rounds=1, **{"min-trainers": 1})
    grid = InProcessGrid([5], node_configs={5: {"device": "bogus"}})
    run_coordinator(grid, cfg)
    initial, after = (load_checkpoint(p).model for _, p in list_checkpoints(checkpoints_dir(cfg.run_dir())))
    assert all(torch.equal(initial[k], after[k]) for k in initial)
    closed = [e for e in control_events(Bus(redis_client, run_id)) if isinstance(e, ev.RoundClosed)][0]
    assert not closed.weights_changed and closed.valid_updates == 0


def test_stop_round_closes_a_time_round_early(small_text, tmp_path, redis_url, redis_client, run_id):
    cfg = config(run_id, small_text, tmp_path / "run", redis_url, rounds=1, **{"round-steps": 0,
                 "round-seconds": 120, "min-trainers": 1})
    grid = InProcessGrid([7])
    bus = Bus(redis_client, run_id)

    def stop_when_training() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(isinstance(e, ev.RoundStarted) for e in control_events(bus)):
                time.sleep(2.0)
                bus.publish(ev.StopRound(round=1, reason=ev.STOP_REASON_OPERATOR, detail="test"))
                return
            time.sleep(0.1)

    stopper = threading.Thread(target=stop_when_training)
    started = time.monotonic()
    stopper.start()
    run_coordinator(grid, cfg)
    stopper.join()
    assert time.monotonic() - started < 60  # far less than the 120 s budget
    closed = [e for e in control_events(bus) if isinstance(e, ev.RoundClosed)][0]
    assert closed.valid_updates == 1


def test_restarted_coordinator_resumes_with_the_same_state(small_text, tmp_path, redis_url, redis_client, run_id):
    first = config(run_id, small_text, tmp_path / "run", redis_url, rounds=1, outer="diloco")
    run_coordinator(InProcessGrid([1, 2]), first)
    round1 = latest_checkpoint(checkpoints_dir(first.run_dir()))
    saved = load_checkpoint(round1)
    assert saved.meta.round == 1 and "outer_momentum" in saved.tensors

    second = config(run_id, small_text, tmp_path / "run", redis_url, rounds=2, outer="diloco")
    grid = InProcessGrid([1, 2])
    assert run_coordinator(grid, second) == 2
    sent = grid.sent[0].content.array_records["weights"].to_torch_state_dict()
    assert all(torch.equal(sent[k], saved.model[k]) for k in saved.model)  # round 2 started from round 1's W
    started = [e for e in control_events(Bus(redis_client, run_id)) if isinstance(e, ev.RunStarted)]
    assert [s.resumed_from_round for s in started] == [0, 1]


def test_grpc_status_and_stop_round_then_stop_run(small_text, tmp_path, redis_url, redis_client, run_id):
    from pilot.grpc_util import make_channel
    from pilot.v1 import services_pb2 as svc
    from pilot.v1 import services_pb2_grpc as svc_grpc
    from services.coordinator.control import read_address

    cfg = config(run_id, small_text, tmp_path / "run", redis_url, rounds=5, **{"round-steps": 0,
                 "round-seconds": 120, "min-trainers": 1})
    bus = Bus(redis_client, run_id)
    seen: dict[str, object] = {}

    def operator() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(isinstance(e, ev.RoundStarted) for e in control_events(bus)):
            time.sleep(0.1)
        stub = svc_grpc.CoordinatorStub(make_channel(read_address(cfg.run_dir())))
        time.sleep(1.0)
        seen["status"] = stub.GetStatus(svc.GetStatusRequest(), timeout=10)
        seen["wrong_round"] = stub.StopRound(svc.StopRoundRequest(round=4), timeout=10)
        seen["stop_run"] = stub.StopRun(svc.StopRunRequest(detail="test over"), timeout=10)
        seen["stop_round"] = stub.StopRound(svc.StopRoundRequest(detail="now"), timeout=10)

    thread = threading.Thread(target=operator)
    thread.start()
    last = run_coordinator(InProcessGrid([3]), cfg)
    thread.join()
    status = seen["status"]
    assert status.state == svc.RUN_STATE_TRAINING and status.round == 1 and status.trainers_alive == ["3"]
    assert not seen["wrong_round"].accepted and "not open" in seen["wrong_round"].message
    assert seen["stop_round"].accepted or seen["stop_run"].accepted
    assert last == 1  # the run stopped after round 1 closed, not after 5 rounds
    stopped = [e for e in control_events(bus) if isinstance(e, ev.RunStopped)][0]
    assert stopped.reason == ev.STOP_REASON_RUN_STOPPING and stopped.last_round == 1
