"""The run's event log against a real Redis: one line per entry, restarts never duplicate, report from it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import redis

from pilot.bus import Bus
from pilot.eventlog import EventLogWriter, event_log_path, read_event_log
from pilot.keys import Stream
from pilot.report import write_report
from pilot.v1 import events_pb2 as ev

PER_ROUND = 8  # entries publish_round() adds: 4 control + 4 telemetry


def publish_round(bus: Bus, round: int) -> None:
    bus.publish(ev.RoundStarted(round=round, duration_s=30, participants=["t0", "t1"]))
    for trainer, loss in (("t0", 3.0), ("t1", 3.2)):
        for step in (1, 2):
            bus.publish(ev.TrainerProgress(trainer_id=trainer, round=round, step=step, tokens=1000 * step,
                                           loss=loss - 0.1 * round - 0.05 * step, elapsed_s=10.0 * step,
                                           tokens_per_s=100.0))
    bus.publish(ev.RoundClosed(round=round, trainers=["t0", "t1"], tokens=4000, valid_updates=2, wall_s=26.0,
                               mean_loss=2.9 - 0.1 * round, weights_changed=True))
    bus.publish(ev.CheckpointPublished(round=round, uri=f"/runs/x/checkpoints/round_{round:05d}", sha256="ab" * 32,
                                       tokens=4000 * round))
    bus.publish(ev.EvalCompleted(round=round, bpb=2.5 - 0.2 * round, tokens=2048, sample=f"sample of round {round}",
                                 status=ev.EVAL_STATUS_OK, eval_s=1.5))


def test_writer_copies_every_entry_once_across_restarts(
    bus: Bus, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = event_log_path(tmp_path)
    bus.publish(ev.RunStarted(model="d4", strategy="diloco", num_rounds=2, min_trainers=2))
    publish_round(bus, 1)
    redis_client.xadd(bus.key(Stream.CONTROL), {b"type": b"RoundClosed", b"v": b"1", b"data": b"\xff\x00"})

    first = EventLogWriter(bus, path)
    assert first.drain() == 1 + PER_ROUND + 1
    first.close()
    restarted = EventLogWriter(bus, path)  # a restart resumes after the last id of each stream
    assert restarted.drain() == 0
    publish_round(bus, 2)
    assert restarted.drain() == PER_ROUND
    restarted.close()

    records = read_event_log(path)
    keys = [(r["stream"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == 1 + PER_ROUND + 1 + PER_ROUND
    expected = {(s.value, e.entry_id) for s in (Stream.CONTROL, Stream.TELEMETRY) for e in bus.replay(s)}
    assert set(keys) == expected
    assert records[0] == {"stream": "control", "id": records[0]["id"], "type": "RunStarted", "event": {
        "schema_version": 1, "run_id": bus.run_id, "model": "d4", "strategy": "diloco", "min_trainers": 2,
        "num_rounds": 2}}
    (bad,) = [r for r in records if "error" in r]
    assert bad["type"] == "RoundClosed" and "malformed" in bad["error"] and "event" not in bad
    progress = [r for r in records if r["type"] == "TrainerProgress"]
    assert progress[0]["stream"] == "telemetry" and progress[0]["event"]["tokens"] == "1000"  # uint64 as text


def test_a_torn_last_line_is_cut_and_the_thread_drains_on_stop(bus: Bus, tmp_path: Path) -> None:
    path = event_log_path(tmp_path)
    publish_round(bus, 1)
    EventLogWriter(bus, path).drain()
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # a crash in the middle of the last line

    writer = EventLogWriter(bus, path)
    assert len(read_event_log(path)) == len(lines) - 1
    writer.start(poll_s=0.1)
    publish_round(bus, 2)
    deadline = time.monotonic() + 10
    while len(read_event_log(path)) < len(lines) + PER_ROUND and time.monotonic() < deadline:
        time.sleep(0.05)
    bus.publish(ev.RunStopped(reason=ev.STOP_REASON_COMPLETED, last_round=2))
    writer.stop()
    assert not any(t.name == "event-log" and t.is_alive() for t in threading.enumerate())
    records = read_event_log(path)
    assert len(records) == 2 * PER_ROUND + 1 and records[-1]["type"] == "RunStopped"
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_report_from_a_real_event_log(bus: Bus, tmp_path: Path) -> None:
    bus.publish(ev.RunStarted(model="d4", strategy="diloco", num_rounds=2, min_trainers=2))
    for round in (1, 2):
        publish_round(bus, round)
    bus.publish(ev.RunStopped(reason=ev.STOP_REASON_COMPLETED, last_round=2))
    EventLogWriter(bus, event_log_path(tmp_path)).drain()

    report = write_report(tmp_path).read_text()
    assert f"# Pilot run report: {bus.run_id}" in report
    assert "| 1 | 4,000 | 4,000 | 2 | 2.8000 | 2.3000 | 26.0 |" in report
    assert "| 2 | 4,000 | 8,000 | 2 | 2.7000 | 2.1000 | 26.0 |" in report
    assert "sample of round 2" in report and "completed" in report
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "round_timing.png", "tokens_per_trainer.png", "train_loss.png", "val_bpb.png"
    ]
