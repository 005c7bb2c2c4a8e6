"""The embedded Redis: auth, durability across a restart (AOF), reconnects, the CLI."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from pilot.bus import Bus, RedisAuthError, RedisUnavailable, RetryPolicy, redis_client
from pilot.keys import Stream
from pilot.ledger import Ledger
from pilot.redis_server import EmbeddedRedis, free_port, resolve_redis
from pilot.v1 import events_pb2 as ev

REPO = Path(__file__).resolve().parents[2]


def test_a_client_without_the_password_is_refused(redis_server: EmbeddedRedis) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=redis_server.port or 0, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(RedisAuthError, match="refused the credentials"):
        redis_client(f"redis://127.0.0.1:{redis_server.port}/0")


def test_a_wrong_password_fails_quickly_with_a_clear_error(redis_server: EmbeddedRedis) -> None:
    t0 = time.monotonic()
    with pytest.raises(RedisAuthError, match="PASSWORD@host"):
        redis_client(f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
    assert time.monotonic() - t0 < 2


def test_an_unreachable_redis_is_a_retryable_error_after_the_bound(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}"):
        redis_client(f"redis://:x@127.0.0.1:{port}/0")
    with EmbeddedRedis(tmp_path / "r") as server:
        bus = Bus(redis_client(server.url), "r1", retry=RetryPolicy(max_elapsed_s=0.3))
    # the server went away and does not come back
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match="unreachable for 0.3s while publishing StopRound"):
        bus.publish(ev.StopRound(round=1))
    assert time.monotonic() - t0 < 3


def test_the_server_is_private(redis_server: EmbeddedRedis) -> None:
    client = redis_server.client(decode_responses=True)
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert client.config_get("protected-mode") == {"protected-mode": "yes"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    conf = redis_server.data_dir / "redis.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    cmdline = Path(f"/proc/{redis_server.pid}/cmdline").read_bytes()
    assert redis_server.password.encode() not in cmdline


def test_ledger_and_streams_survive_a_restart_and_clients_reconnect(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis_client(server.url)
        bus, ledger = Bus(client, "durable"), Ledger(client, "durable")
        ledger.init_epoch({f"u{i}": 10 for i in range(6)})
        held = ledger.lease("t0", ttl_s=600)
        done = ledger.lease("t1", ttl_s=600)
        assert held and done
        ledger.complete(done, tokens=10, round=1)
        started = bus.publish(ev.RoundStarted(round=1, duration_s=5))
        bus.publish(ev.StopRound(round=1))
        before = ledger.stats()

        server.stop()
        published: list[str] = []
        writer = threading.Thread(target=lambda: published.append(bus.publish(ev.RoundClosed(round=1, tokens=10))))
        writer.start()  # retries (backoff) while Redis is down
        time.sleep(0.5)
        assert not published
        server.start()
        writer.join(timeout=30)

        assert published, "the publish issued during the outage did not go through"
        assert ledger.stats() == before
        assert bus.find_stop(1, started) is not None
        assert [type(e.event).__name__ for e in bus.replay(Stream.CONTROL)] == ["RoundStarted", "StopRound", "RoundClosed"]
        ledger.complete(held, tokens=10, round=1)  # the lease held across the restart is still valid
        assert ledger.stats().done == 2


def test_resolve_redis_prefers_a_given_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_redis("redis://:pw@db:6379/0", tmp_path) == ("redis://:pw@db:6379/0", None)
    monkeypatch.setenv("PILOT_REDIS_URL", "rediss://:pw@db:6380/0")
    assert resolve_redis(None, tmp_path) == ("rediss://:pw@db:6380/0", None)
    monkeypatch.delenv("PILOT_REDIS_URL")
    url, server = resolve_redis(None, tmp_path / "embedded")
    try:
        assert server is not None and url == server.url
        assert redis_client(url).ping()
    finally:
        assert server is not None
        server.stop()


def test_pilot_redis_serve_prints_its_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot.cli", "redis", "serve", "--dir", str(tmp_path / "r"), "--password", "s3cret"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://:s3cret@127.0.0.1:")
        assert redis_client(url).ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0
    with pytest.raises(RedisUnavailable):
        redis_client(url)
