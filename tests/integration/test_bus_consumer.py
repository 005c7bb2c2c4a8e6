"""Consumer groups against a real Redis: dead consumers, poison and garbage entries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from pilot.bus import Bus, BusEntry, GroupConsumer
from pilot.keys import Stream
from pilot.v1 import events_pb2 as ev

REPO = Path(__file__).resolve().parents[2]

_DYING_CONSUMER = textwrap.dedent(
    """
    import sys, time
    from pilot.bus import Bus, GroupConsumer, redis_client
    from pilot.keys import Stream
    bus = Bus(redis_client(sys.argv[1]), sys.argv[2])
    def handler(entry):
        print(entry.entry_id, flush=True)
        time.sleep(3600)  # killed here, before XACK
    GroupConsumer(bus, Stream.CONTROL, "coordinator", "doomed").poll(handler, block_ms=20000)
    """
)


def test_entries_of_a_killed_consumer_are_claimed_by_another(bus: Bus, redis_url: str, run_id: str) -> None:
    entry_id = bus.publish(ev.StopRound(round=7, detail="claim me"))
    doomed = subprocess.Popen(
        [sys.executable, "-c", _DYING_CONSUMER, redis_url, run_id],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert doomed.stdout is not None
        assert doomed.stdout.readline().strip() == entry_id  # delivered to it, not acked
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()

    survivor = GroupConsumer(bus, Stream.CONTROL, "coordinator", "survivor", claim_idle_ms=100)
    assert survivor.pending() == 1
    got: list[BusEntry] = []
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        result = survivor.poll(got.append, block_ms=50)
    assert [e.entry_id for e in got] == [entry_id]
    assert result.claimed == 1 and isinstance(got[0].event, ev.StopRound) and got[0].event.round == 7
    assert survivor.pending() == 0


def test_bad_entries_are_dead_lettered_and_the_consumer_keeps_going(bus: Bus, redis_client: redis.Redis) -> None:
    key = bus.key(Stream.CONTROL)
    first = bus.publish(ev.StopRound(round=1))
    bad = {
        redis_client.xadd(key, {b"type": b"StopRound", b"v": b"1", b"data": b"\xff\xfe garbage"}): "malformed",
        redis_client.xadd(key, {b"type": b"Teleport", b"v": b"1", b"data": b""}): "unknown-type",
        redis_client.xadd(key, {b"type": b"StopRound", b"v": b"99", b"data": b""}): "newer-version",
        redis_client.xadd(key, {b"hello": b"world"}): "missing-fields",
    }
    last = bus.publish(ev.StopRound(round=2))

    handled: list[str] = []
    consumer = GroupConsumer(bus, Stream.CONTROL, "g", "c1")
    result = consumer.poll(lambda e: handled.append(e.entry_id))

    assert handled == [first, last]
    assert (result.handled, result.dead_lettered, result.failed) == (2, 4, 0)
    assert consumer.pending() == 0
    letters = list(bus.replay(Stream.DEADLETTER))
    reasons = {e.dead_letter.source_id: e.dead_letter.reason for e in letters if e.dead_letter}
    assert {i.decode(): code for i, code in bad.items()} == {i: r.split(":")[0] for i, r in reasons.items()}
    assert all(e.dead_letter and e.dead_letter.group == "g" and e.dead_letter.source_stream == "control" for e in letters)
    assert letters[0].fields[b"data"] == b"\xff\xfe garbage"  # the original bytes are kept for forensics


def test_an_entry_whose_handler_keeps_failing_is_dead_lettered_after_max_deliveries(bus: Bus) -> None:
    poison = bus.publish(ev.StopRound(round=1, detail="poison"))
    fine = bus.publish(ev.StopRound(round=2))
    handled: list[str] = []

    def handler(entry: BusEntry) -> None:
        assert isinstance(entry.event, ev.StopRound)
        if entry.event.detail == "poison":
            raise RuntimeError("cannot handle this")
        handled.append(entry.entry_id)

    consumer = GroupConsumer(bus, Stream.CONTROL, "g", "c1", claim_idle_ms=30, max_deliveries=2)
    totals = {"failed": 0, "dead": 0}
    for _ in range(3):
        result = consumer.poll(handler)
        totals["failed"] += result.failed
        totals["dead"] += result.dead_lettered
        time.sleep(0.06)

    assert handled == [fine]  # the good entry after the poison one was not held up
    assert totals == {"failed": 2, "dead": 1}
    (letter,) = list(bus.replay(Stream.DEADLETTER))
    assert letter.dead_letter is not None and letter.dead_letter.source_id == poison
    assert "delivered 3 times" in letter.dead_letter.reason and "cannot handle this" in letter.dead_letter.reason
    assert consumer.pending() == 0


def test_a_group_deleted_under_a_consumer_is_recreated(bus: Bus, redis_client: redis.Redis) -> None:
    consumer = GroupConsumer(bus, Stream.TELEMETRY, "liveness", "c1")
    consumer.poll(lambda e: None)
    redis_client.delete(bus.key(Stream.TELEMETRY))
    bus.publish(ev.TrainerHeartbeat(trainer_id="t0"))
    seen: list[BusEntry] = []
    consumer.poll(seen.append)
    assert len(seen) == 1 and seen[0].ok


def test_the_dead_letter_stream_cannot_be_consumed_by_a_group(bus: Bus) -> None:
    with pytest.raises(ValueError):
        GroupConsumer(bus, Stream.DEADLETTER, "g", "c")


def test_pending_entries_trimmed_away_are_acknowledged(bus: Bus, redis_client: redis.Redis) -> None:
    for _ in range(3):
        bus.publish(ev.TrainerHeartbeat(trainer_id="t0"))
    consumer = GroupConsumer(bus, Stream.TELEMETRY, "liveness", "c1", claim_idle_ms=10)

    def fail(entry: BusEntry) -> None:
        raise RuntimeError("not now")

    assert consumer.poll(fail).failed == 3
    redis_client.xtrim(bus.key(Stream.TELEMETRY), maxlen=0)  # MAXLEN trimming caught up with them
    time.sleep(0.03)
    consumer.poll(fail)
    assert consumer.pending() == 0
