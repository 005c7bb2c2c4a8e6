"""`pilot events tail` against a real Redis: decoded lines, JSON, undecodable entries."""

from __future__ import annotations

import json

import redis
from typer.testing import CliRunner

from pilot.bus import Bus
from pilot.cli import app
from pilot.keys import Stream
from pilot.v1 import events_pb2 as ev

runner = CliRunner()


def _tail(redis_url: str, run_id: str, *extra: str) -> list[str]:
    result = runner.invoke(app, ["events", "tail", "--run", run_id, "--redis", redis_url, *extra])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_tail_prints_decoded_events_and_survives_garbage(bus: Bus, redis_client: redis.Redis, redis_url: str) -> None:
    first = bus.publish(ev.RoundStarted(round=1, duration_s=60, participants=["t0", "t1"]))
    redis_client.xadd(bus.key(Stream.CONTROL), {b"type": b"StopRound", b"v": b"1", b"data": b"\xff"})
    bus.publish(ev.StopRound(round=1, reason=ev.STOP_REASON_OPERATOR))
    bus.publish(ev.TrainerProgress(trainer_id="t0", round=1, step=3, loss=2.5))

    lines = _tail(redis_url, bus.run_id)
    assert len(lines) == 3
    assert lines[0].startswith(first) and "RoundStarted" in lines[0] and 'participants=["t0","t1"]' in lines[0]
    assert "<undecodable: malformed" in lines[1]
    assert "StopRound" in lines[2] and 'reason="STOP_REASON_OPERATOR"' in lines[2]

    records = [json.loads(line) for line in _tail(redis_url, bus.run_id, "--json", "--from", first)]
    assert [r["type"] for r in records] == ["StopRound", "StopRound"]
    assert "error" in records[0] and records[1]["event"] == {"round": 1, "reason": "STOP_REASON_OPERATOR"}

    every = [json.loads(line) for line in _tail(redis_url, bus.run_id, "--json", "--stream", "all")]
    assert sorted((r["stream"], r["type"]) for r in every) == [
        ("control", "RoundStarted"), ("control", "StopRound"), ("control", "StopRound"), ("telemetry", "TrainerProgress")
    ]


def test_tail_errors_are_one_line_with_exit_2(run_id: str) -> None:
    result = runner.invoke(app, ["events", "tail", "--run", run_id, "--redis", "redis://:x@127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "error: cannot reach Redis at 127.0.0.1:1/0" in result.stderr
    bad = runner.invoke(app, ["events", "tail", "--run", "bad run", "--redis", "redis://:x@127.0.0.1:1/0"])
    assert bad.exit_code == 2 and "invalid run id" in bad.stderr


def test_runs_lists_a_run_once_it_started(bus: Bus, redis_url: str) -> None:
    assert bus.run_id not in "\n".join(_runs(redis_url))
    bus.publish(ev.RunStarted(model="d4"))
    bus.publish(ev.RunStarted(model="d4", resumed_from_round=2))  # a resume keeps the first start time
    (line,) = [line for line in _runs(redis_url) if line.startswith(bus.run_id + "\t")]
    assert line.endswith("+00:00")


def _runs(redis_url: str) -> list[str]:
    result = runner.invoke(app, ["events", "runs", "--redis", redis_url])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()
