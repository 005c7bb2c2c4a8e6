"""The data ledger against a real Redis: exclusive leases, expiry, partial units, epochs."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter

import pytest
import redis

from pilot.bus import redis_client as make_client
from pilot.ledger import Lease, LeaseLost, Ledger, LedgerError

UNITS = {f"shard_{i // 4:05d}.parquet:{i % 4}": 100 + i for i in range(40)}


def _drain(url: str, run_id: str, trainer: str, out: "multiprocessing.Queue[list[str]] | None" = None) -> list[str]:
    """Lease and complete units until none is left; the units this trainer completed."""
    ledger = Ledger(make_client(url), run_id)
    done: list[str] = []
    while (lease := ledger.lease(trainer, ttl_s=30)) is not None:
        if lease.epoch > 0:  # epoch 0 is over (everything pending again): hand it back, stop
            ledger.release_partial(lease, offset=0, tokens=0, round=1)
            break
        done.append(lease.unit)
        ledger.complete(lease, tokens=lease.size, round=1)
    if out is not None:
        out.put(done)
    return done


@pytest.fixture
def ledger(redis_client: redis.Redis, run_id: str) -> Ledger:
    led = Ledger(redis_client, run_id)
    assert led.init_epoch(UNITS) is True
    return led


def test_init_is_idempotent_and_refuses_other_units(ledger: Ledger) -> None:
    assert ledger.init_epoch(UNITS) is False
    with pytest.raises(LedgerError, match="other units"):
        ledger.init_epoch({"a:0": 1})
    stats = ledger.stats()
    assert (stats.epoch, stats.units, stats.pending, stats.leased, stats.done) == (0, 40, 40, 0, 0)


def test_threads_never_lease_the_same_unit_and_the_epoch_has_every_unit_once(
    ledger: Ledger, redis_url: str, run_id: str
) -> None:
    results: dict[str, list[str]] = {}
    threads = [
        threading.Thread(target=lambda t=f"t{i}": results.__setitem__(t, _drain(redis_url, run_id, t)))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(u for units in results.values() for u in units)
    assert set(counts) == set(UNITS) and max(counts.values()) == 1
    stats = ledger.stats()
    assert stats.epoch == 1 and stats.pending == 40 and stats.done == 0  # epoch advanced, all pending again
    assert stats.tokens_total == sum(UNITS.values()) == sum(stats.tokens_by_trainer.values())
    assert stats.tokens_by_round == {1: sum(UNITS.values())}


def test_two_processes_never_lease_the_same_unit(ledger: Ledger, redis_url: str, run_id: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(redis_url, run_id, f"p{i}", out)) for i in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    counts = Counter(u for units in got for u in units)
    assert set(counts) == set(UNITS) and max(counts.values()) == 1
    assert ledger.stats().epoch == 1


def test_an_expired_lease_returns_to_the_pool_and_its_holder_loses_it(ledger: Ledger) -> None:
    lease = ledger.lease("dead", ttl_s=0.05)
    assert lease is not None
    time.sleep(0.1)
    assert ledger.reclaim_expired() == [lease.unit]
    again = ledger.lease("alive", ttl_s=30)
    assert again is not None and again.unit == lease.unit  # first in line
    with pytest.raises(LeaseLost):
        ledger.complete(lease, tokens=1, round=1)
    with pytest.raises(LeaseLost):
        ledger.renew(lease, ttl_s=30)


def test_lease_reclaims_expired_leases_by_itself_and_renew_keeps_a_lease(ledger: Ledger) -> None:
    short = ledger.lease("a", ttl_s=0.05)
    kept = ledger.lease("b", ttl_s=0.05)
    assert short and kept
    kept = ledger.renew(kept, ttl_s=30)
    time.sleep(0.1)
    nxt = ledger.lease("c", ttl_s=30)
    assert nxt is not None and nxt.unit == short.unit
    assert set(ledger.leases()) == {kept.unit, nxt.unit}
    assert ledger.leases()[kept.unit][0] == "b"
    assert ledger.complete(kept, tokens=5, round=2) is False


def test_a_partial_release_resumes_at_its_offset_before_fresh_units(ledger: Ledger) -> None:
    first = ledger.lease("t0", ttl_s=30)
    second = ledger.lease("t0", ttl_s=30)
    assert first and second and first.offset == 0
    ledger.release_partial(second, offset=40, tokens=40, round=1)  # round ended mid-unit
    resumed = ledger.lease("t1", ttl_s=30)
    assert resumed is not None and (resumed.unit, resumed.offset) == (second.unit, 40)
    with pytest.raises(LedgerError, match="before the unit cursor"):
        ledger.release_partial(resumed, offset=10, tokens=0, round=2)
    ledger.release_partial(resumed, offset=resumed.size, tokens=resumed.size - 40, round=2)  # reaching the end completes
    stats = ledger.stats()
    assert stats.done == 1 and stats.partial == 0
    assert stats.tokens_by_trainer == {"t0": 40, "t1": second.size - 40}
    assert stats.tokens_by_round == {1: 40, 2: second.size - 40}


def test_a_retried_complete_is_not_counted_twice(ledger: Ledger) -> None:
    lease = ledger.lease("t0", ttl_s=30)
    assert lease is not None
    ledger.complete(lease, tokens=10, round=1)
    ledger.complete(lease, tokens=10, round=1)  # e.g. the first reply was lost and the call retried
    stats = ledger.stats()
    assert (stats.done, stats.tokens_total) == (1, 10)


def test_a_lease_survives_serialisation(ledger: Ledger) -> None:
    lease = ledger.lease("t0", ttl_s=30)
    assert lease is not None
    restored = Lease.from_dict(lease.as_dict())  # e.g. a fresh ClientApp process
    assert restored == lease
    ledger.complete(restored, tokens=1, round=1)


def test_nothing_left_returns_none_until_an_epoch_completes(redis_client: redis.Redis, run_id: str) -> None:
    ledger = Ledger(redis_client, run_id)
    ledger.init_epoch([("u0", 5), ("u1", 5)])
    a, b = ledger.lease("t", 30), ledger.lease("t", 30)
    assert a and b and ledger.lease("t", 30) is None
    assert ledger.complete(a, 5, 1) is False
    assert ledger.complete(b, 5, 1) is True
    nxt = ledger.lease("t", 30)
    assert nxt is not None and nxt.epoch == 1 and nxt.unit == "u0"
