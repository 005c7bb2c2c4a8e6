"""The long-lived trainer host behind the thin ClientApp: reuse across rounds, crashes, idle exit, lifetime rules.

Rounds go through the real coordinator and the real ClientApp (in threads behind the
in-process grid, with node-config ``trainer-host=on``), so the host is a real separate
process serving a real Unix socket, trained against the embedded Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import torch

from pilot.bus import Bus
from pilot.federated import UpdateCodec, from_records
from pilot.flower import leftover_processes
from pilot.keys import Stream
from pilot.protocol import ORDER, REPORT, TRAINER, UPDATE, UPDATE_META, RoundOrder
from pilot.run_config import run_config_from
from pilot.v1 import events_pb2 as ev
from services.coordinator.server_app import run_coordinator
from services.trainer.host_client import (
    PID_FILE,
    HostSettings,
    HostSpec,
    TrainerHostError,
    ensure_host,
    exchange_dir,
    read_pid_file,
    round_request,
    socket_path,
    stop_host,
)
from services.trainer.identity import TrainerIdentity
from tests.integration.inprocess_grid import InProcessGrid


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply with the round it answers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies_by_round: dict[int, object] = {}

    def pull_messages(self, message_ids):
        ready = list(super().pull_messages(message_ids))
        sent = {m.metadata.message_id: m for m in self.sent}
        for reply in ready:
            order = RoundOrder.from_record(sent[reply.metadata.reply_to_message_id].content.config_records[ORDER])
            self.replies_by_round[order.round] = reply
        return ready


@pytest.fixture(scope="module")
def small_text(shakespeare_prefix) -> Path:
    return shakespeare_prefix(120_000)


def run_cfg(run_id: str, data: Path, out: Path, redis_url: str, **extra: object):
    values: dict[str, object] = {
        "run-id": run_id, "data": str(data), "out": str(out), "redis-url": redis_url, "preset": "d1",
        "seq-len": 32, "batch-size": 4, "rounds": 2, "round-steps": 3, "min-trainers": 1, "evaluate": False,
        "device": "cpu", "reply-grace-s": 120, "trainer-wait-s": 120, "progress-every-s": 0.5,
    }
    values.update(extra)
    return run_config_from(values)


def gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not leftover_processes([pid]):
            return True
        time.sleep(0.2)
    return False


def test_second_round_reuses_the_host_and_an_idle_host_exits(small_text, tmp_path, redis_url, run_id):
    work_dir = tmp_path / "trainer"
    grid = RecordingGrid([21], node_configs={21: {"trainer-host": "on", "trainer-host-idle-s": 5,
                                                  "work-dir": str(work_dir)}})
    cfg = run_cfg(run_id, small_text, tmp_path / "run", redis_url)
    assert run_coordinator(grid, cfg) == 2
    replies = grid.replies_by_round
    assert not replies[1].has_error() and not replies[2].has_error()
    pids = [int(replies[r].content.config_records[TRAINER]["host-pid"]) for r in (1, 2)]
    setup = [float(replies[r].content.metric_records[REPORT]["setup_seconds"]) for r in (1, 2)]
    steps = [int(replies[r].content.metric_records[REPORT]["steps"]) for r in (1, 2)]
    assert pids[0] == pids[1] != os.getpid()
    assert [int(replies[r].content.config_records[TRAINER]["host-rounds"]) for r in (1, 2)] == [1, 2]
    assert steps == [3, 3]
    assert setup[1] < 0.5 * setup[0], setup  # round 1 paid the host's imports, round 2 did not
    assert read_pid_file(work_dir)["pid"] == pids[0]
    assert not list(exchange_dir(work_dir).iterdir())  # weights and update files were deleted
    # nothing runs for 5 s: the host exits on its own and cleans up after itself
    assert gone_within(pids[0], 30), "the idle host did not exit"
    assert not (work_dir / PID_FILE).exists() and not socket_path(work_dir).exists()


def round_delta(reply) -> dict[str, torch.Tensor]:  # noqa: ANN001 - a Flower reply Message
    content = reply.content
    return UpdateCodec("fp32").decode(from_records(content.array_records[UPDATE], content.config_records[UPDATE_META]))


def test_compile_true_trains_on_the_host_as_eager_does_and_caches_its_kernels(small_text, tmp_path, redis_url,
                                                                              run_id):
    deltas = {}
    for mode, compiled in (("off", False), ("on", True)):  # the same rounds, eager in-process vs compiled host
        work_dir = tmp_path / f"trainer-{mode}"
        grid = RecordingGrid([41], node_configs={41: {"trainer-host": mode, "work-dir": str(work_dir)}})
        cfg = run_cfg(f"{run_id}-{mode}", small_text, tmp_path / f"run-{mode}", redis_url, compile=compiled,
                      dropout=0.0, **{"round-steps": 2})
        assert run_coordinator(grid, cfg) == 2
        assert not any(reply.has_error() for reply in grid.replies_by_round.values())
        deltas[mode] = [round_delta(grid.replies_by_round[r]) for r in (1, 2)]
    stop_host(tmp_path / "trainer-on", grace_s=1.0)
    assert any((tmp_path / "trainer-on" / "compile-cache").rglob("*.py"))  # inductor's kernels, in the work dir
    for eager, compiled in zip(deltas["off"], deltas["on"], strict=True):
        for name, tensor in eager.items():
            # inductor fuses and reorders float sums; AdamW can blow a rounding difference in a near-zero
            # gradient up to a full step for a few elements (as in the DDP parity tests)
            close = torch.isclose(compiled[name], tensor, rtol=1e-3, atol=1e-5)
            assert close.float().mean() >= 0.999, f"{name}: {(~close).sum()} of {close.numel()} elements differ"


def test_host_killed_mid_round_gives_an_error_reply_and_the_next_round_a_new_host(
    small_text, tmp_path, redis_url, redis_client, run_id
):
    work_dir = tmp_path / "trainer"
    grid = RecordingGrid([31], node_configs={31: {"trainer-host": "on", "work-dir": str(work_dir)}})
    cfg = run_cfg(run_id, small_text, tmp_path / "run", redis_url, rounds=3,
                  **{"round-steps": 0, "round-seconds": 10.0, "upload-margin-s": 0.5})
    bus = Bus(redis_client, run_id)
    killed: list[int] = []

    def kill_host_when_training_round_2() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            entries = bus.read_streams({Stream.TELEMETRY: "0-0"}, count=10_000)
            if any(isinstance(e.event, ev.TrainerHeartbeat) and e.event.round == 2
                   and e.event.state == ev.TRAINER_STATE_TRAINING for e in entries):
                time.sleep(1.0)
                pid = read_pid_file(work_dir)["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_host_when_training_round_2)
    killer.start()
    assert run_coordinator(grid, cfg) == 3
    killer.join()
    replies = grid.replies_by_round
    assert killed, "round 2 never started training"
    assert replies[2].has_error() and "went away during round 2" in replies[2].error.reason
    first, third = (int(replies[r].content.config_records[TRAINER]["host-pid"]) for r in (1, 3))
    assert first == killed[0] and third != first
    assert not replies[3].has_error()
    rejected = [e for e in (x.event for x in bus.read(count=10_000)) if isinstance(e, ev.UpdateRejected)]
    assert [(e.round, "went away" in e.reason) for e in rejected] == [(2, True)]
    assert stop_host(work_dir) == third
    assert gone_within(third, 15)


def test_host_lifetime_reuse_replacement_orphaning_and_a_vanished_client(tmp_path):
    work_dir = tmp_path / "w"
    supernode = subprocess.Popen(["sleep", "600"])  # stands in for the SuperNode side the host watches
    settings = HostSettings(mode="on", idle_exit_s=600)
    spec = HostSpec(run_id="run-a", work_dir=work_dir, settings=settings, watch_pid=supernode.pid)
    try:
        first = ensure_host(spec)
        assert first.started and first.info.run_id == "run-a" and first.info.watch_pid == supernode.pid
        again = ensure_host(spec)
        assert not again.started and again.pid == first.pid  # same run, work dir, code: reused
        other = ensure_host(HostSpec(run_id="run-b", work_dir=work_dir, settings=settings, watch_pid=supernode.pid))
        assert other.started and other.pid != first.pid  # another run never reuses a host
        assert gone_within(first.pid, 15)

        # a client that gives up mid-round (here: its deadline passes) takes the host down with it
        who = TrainerIdentity(trainer_id="t", node_id=1, work_dir=work_dir)
        order = RoundOrder(round=1, seconds=5.0, steps=0, since_id="0-0", tokenizer_sha256="x",
                           run_config={"run-id": "run-b"})
        request = round_request(order, who, exchange_dir(work_dir) / "weights.safetensors", elapsed_s=0.0)
        with pytest.raises(TrainerHostError, match="did not finish round 1 within"):
            other.run_round(request, timeout_s=0.5)
        assert gone_within(other.pid, 15)

        # the watched process ends: so does the host
        last = ensure_host(HostSpec(run_id="run-b", work_dir=work_dir, settings=settings, watch_pid=supernode.pid))
        assert last.started and last.pid != other.pid
        supernode.kill()
        supernode.wait()
        assert gone_within(last.pid, 15)
        assert not (work_dir / PID_FILE).exists()
    finally:
        supernode.kill()
        supernode.wait()
        stop_host(work_dir, grace_s=1.0)
