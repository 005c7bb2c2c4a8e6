"""The bus against a real Redis: publish, replay, consumer groups, stop watching."""

from __future__ import annotations

import threading
import time

import redis

from pilot.bus import EVENT_TYPES, Bus, GroupConsumer
from pilot.bus.streams import BusEntry
from pilot.keys import Stream
from pilot.v1 import events_pb2 as ev
from tests.unit.test_proto_registry import sample_events


def test_every_event_type_round_trips_through_its_stream_and_a_group(bus: Bus) -> None:
    events = sample_events()
    ids = [(EVENT_TYPES[type(e).__name__].stream, bus.publish(e)) for e in events]  # ids are unique per stream

    replayed = list(bus.replay(Stream.CONTROL)) + list(bus.replay(Stream.TELEMETRY))
    assert all(entry.ok for entry in replayed)
    by_id = {(entry.stream, entry.entry_id): entry.event for entry in replayed}
    assert len(by_id) == len(events)
    assert [by_id[i] for i in ids] == events

    seen: list[BusEntry] = []
    for stream in (Stream.CONTROL, Stream.TELEMETRY):
        consumer = GroupConsumer(bus, stream, "archiver", "a1")
        result = consumer.poll(seen.append)
        assert result.failed == result.dead_lettered == 0
        assert consumer.pending() == 0
    assert [e.event for e in seen] == [e for e in events if e.DESCRIPTOR.name not in ("TrainerHeartbeat", "TrainerProgress")] + events[-2:]


def test_replay_from_round_started_sees_a_stop_published_before_the_reader_started(bus: Bus) -> None:
    bus.publish(ev.RoundStarted(round=1, duration_s=10))
    bus.publish(ev.StopRound(round=1))
    started = bus.publish(ev.RoundStarted(round=2, duration_s=10, participants=["t0"]))
    bus.publish(ev.TrainerProgress(trainer_id="t0", round=2, step=1))
    bus.publish(ev.StopRound(round=2, reason=ev.STOP_REASON_OPERATOR))  # before any reader looked

    assert bus.find_round_started(2) == started
    stop = bus.find_stop(2, started)
    assert stop is not None and stop.reason == ev.STOP_REASON_OPERATOR
    assert bus.find_stop(3, started) is None
    assert bus.find_stop(1, started) is None  # round 1's stop lies before round 2 started


def test_stop_watcher_polls_cheaply_and_wait_wakes_on_a_stop(bus: Bus) -> None:
    started = bus.publish(ev.RoundStarted(round=5, duration_s=10))
    watcher = bus.stop_watcher(5, started)
    assert watcher.poll() is None
    assert watcher.wait(0.2) is None

    timer = threading.Timer(0.3, lambda: bus.publish(ev.StopRound(round=5, detail="now")))
    timer.start()
    t0 = time.monotonic()
    stop = watcher.wait(10)
    waited = time.monotonic() - t0
    timer.join()
    assert stop is not None and stop.detail == "now"
    assert waited < 3
    assert watcher.poll() is stop  # remembered


def test_undecodable_entries_are_reported_not_raised_when_reading(bus: Bus, redis_client: redis.Redis) -> None:
    redis_client.xadd(bus.key(Stream.CONTROL), {b"type": b"StopRound", b"v": b"1", b"data": b"\xff\x01"})
    bus.publish(ev.StopRound(round=1))
    entries = bus.read(Stream.CONTROL)
    assert [e.ok for e in entries] == [False, True]
    assert entries[0].error is not None and entries[0].error.code == "malformed"


def test_telemetry_is_capped(redis_client: redis.Redis, run_id: str) -> None:
    bus = Bus(redis_client, run_id, telemetry_maxlen=50)
    for step in range(400):
        bus.publish(ev.TrainerProgress(trainer_id="t0", round=1, step=step + 1))
    assert 50 <= bus.length(Stream.TELEMETRY) < 400  # MAXLEN ~ trims whole macro nodes
