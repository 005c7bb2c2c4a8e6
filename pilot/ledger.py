"""The data ledger: which work units are pending, leased, partly or fully trained.

A *work unit* is an opaque string id (e.g. ``"shard_00003.parquet:7"``, a
parquet row group) with a size (its token or row count). The ledger hands units
out to trainers as *leases* and records what was trained, so that within an
epoch nothing is skipped and nothing is trained twice:

- every unit is in exactly one place: pending (sorted set), leased (sorted set
  by expiry), or done (set) — moves between them are Lua scripts, atomic;
- a lease expires (Redis server time, ``TIME`` — never a machine's wall clock)
  unless renewed; an expired lease goes back to pending the next time anyone
  leases, keeping the unit's in-unit cursor;
- a round that ends mid-unit calls :meth:`Ledger.release_partial` with the
  offset reached: the unit returns to pending (ahead of fresh units) and the
  next lease of it starts at that offset;
- when every unit is done the epoch advances and all units are pending again;
- tokens are totalled per trainer and per round.

Each lease carries a token; only the holder of the current lease can renew,
complete or release it (:class:`LeaseLost` otherwise). A retried complete or
release whose first attempt did apply is recognised (per-trainer receipt) and
not applied twice. Key names come from :mod:`pilot.keys`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from pilot import keys
from pilot.bus.connection import RetryPolicy
from pilot.errors import ConfigError, PilotError
from pilot.keys import LedgerKey


class LedgerError(PilotError):
    """The ledger was used inconsistently (other units for the same run, bad offset...)."""


class LeaseLost(LedgerError):
    """The lease expired and was handed to someone else (or never existed)."""


@dataclass(frozen=True)
class Lease:
    """A trainer's claim on one unit; serialisable (``as_dict``) for trainer-local state."""

    unit: str
    size: int  # the unit's size (tokens or rows)
    offset: int  # where training starts inside the unit (0 unless resumed)
    trainer_id: str
    token: int  # unique per lease
    expires_ms: int  # Redis server time; only comparable with Redis TIME
    epoch: int

    @property
    def owner(self) -> str:
        return f"{self.trainer_id}|{self.token}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lease:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LedgerStats:
    epoch: int
    units: int
    pending: int
    leased: int
    done: int  # completed in the current epoch
    partial: int  # units with a stored in-unit cursor
    tokens_total: int
    tokens_by_trainer: dict[str, int]
    tokens_by_round: dict[int, int]


# KEYS[1..11] are the ledger keys in LedgerKey order; every script starts with this.
_PRELUDE = """
local META, UNITS, ORDER, PENDING, LEASES, OWNER, CURSOR, DONE, TOK_TRAINER, TOK_ROUND, RECEIPTS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function requeue(unit)
  -- partly trained units go ahead of fresh ones, each group in epoch order
  local prio = tonumber(redis.call('HGET', ORDER, unit))
  if redis.call('HEXISTS', CURSOR, unit) == 1 then prio = prio - redis.call('HLEN', UNITS) end
  redis.call('ZADD', PENDING, prio, unit)
end
local function reclaim(now)
  local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now)
  for _, unit in ipairs(expired) do
    redis.call('ZREM', LEASES, unit)
    redis.call('HDEL', OWNER, unit)
    requeue(unit)
  end
  return expired
end
local function account(trainer, tokens, round)
  redis.call('HINCRBY', TOK_TRAINER, trainer, tokens)
  redis.call('HINCRBY', TOK_ROUND, round, tokens)
  redis.call('HINCRBY', META, 'tokens_total', tokens)
end
-- nil when `owner` holds the unit's lease; else an error reply (or 'dup' for a retried call)
local function check_owner(unit, owner, trainer, token)
  if redis.call('HGET', OWNER, unit) == owner then return nil end
  if redis.call('HGET', RECEIPTS, trainer) == token then return 'dup' end
  return redis.error_reply('LEASE_LOST unit ' .. unit .. ' is no longer leased by ' .. owner)
end
local function finish(unit, trainer, token)
  redis.call('ZREM', LEASES, unit)
  redis.call('HDEL', OWNER, unit)
  redis.call('HSET', RECEIPTS, trainer, token)
end
local function complete(unit)
  redis.call('HDEL', CURSOR, unit)
  redis.call('SADD', DONE, unit)
  if redis.call('SCARD', DONE) < redis.call('HLEN', UNITS) then return 0 end
  redis.call('DEL', DONE)
  local order = redis.call('HGETALL', ORDER)
  for i = 1, #order, 1000 do
    local args = {}
    for j = i, math.min(i + 999, #order), 2 do
      args[#args + 1] = order[j + 1]
      args[#args + 1] = order[j]
    end
    redis.call('ZADD', PENDING, unpack(args))
  end
  redis.call('HINCRBY', META, 'epoch', 1)
  return 1
end
"""

_INIT = """
local fp = redis.call('HGET', META, 'fingerprint')
if fp then
  if fp ~= ARGV[1] then return redis.error_reply('LEDGER_MISMATCH ledger holds other units (fingerprint ' .. fp .. ')') end
  return 0
end
local n = 0
for i = 2, #ARGV, 2 do
  redis.call('HSET', UNITS, ARGV[i], ARGV[i + 1])
  redis.call('HSET', ORDER, ARGV[i], n)
  redis.call('ZADD', PENDING, n, ARGV[i])
  n = n + 1
end
redis.call('HSET', META, 'fingerprint', ARGV[1], 'units', n, 'epoch', 0, 'tokens_total', 0)
return 1
"""

_LEASE = """
local trainer, ttl = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
reclaim(now)
local popped = redis.call('ZPOPMIN', PENDING)
if #popped == 0 then return false end
local unit = popped[1]
local token = redis.call('HINCRBY', META, 'lease_seq', 1)
local expires = now + ttl
redis.call('ZADD', LEASES, expires, unit)
redis.call('HSET', OWNER, unit, trainer .. '|' .. token)
return {unit, redis.call('HGET', UNITS, unit), redis.call('HGET', CURSOR, unit) or '0',
        tostring(token), tostring(expires), redis.call('HGET', META, 'epoch')}
"""

_RENEW = """
local unit, owner, trainer, token, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('HGET', OWNER, unit) ~= owner then
  return redis.error_reply('LEASE_LOST unit ' .. unit .. ' is no longer leased by ' .. owner)
end
local expires = now_ms() + ttl
redis.call('ZADD', LEASES, expires, unit)
return tostring(expires)
"""

_COMPLETE = """
local unit, owner, trainer, token, tokens, round = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local bad = check_owner(unit, owner, trainer, token)
if bad == 'dup' then return {0, 1} elseif bad then return bad end
finish(unit, trainer, token)
account(trainer, tokens, round)
return {complete(unit), 0}
"""

_RELEASE = """
local unit, owner, trainer, token, tokens, round = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local offset = tonumber(ARGV[7])
local bad = check_owner(unit, owner, trainer, token)
if bad == 'dup' then return {0, 1} elseif bad then return bad end
local size = tonumber(redis.call('HGET', UNITS, unit))
local cursor = tonumber(redis.call('HGET', CURSOR, unit) or '0')
if offset < cursor or offset < 0 then
  return redis.error_reply('BAD_OFFSET offset ' .. offset .. ' is before the unit cursor ' .. cursor .. ' of ' .. unit)
end
finish(unit, trainer, token)
account(trainer, tokens, round)
if offset >= size then return {complete(unit), 0} end
if offset > 0 then redis.call('HSET', CURSOR, unit, offset) end
requeue(unit)
return {0, 0}
"""

_RECLAIM = "return reclaim(now_ms())"


def _fingerprint(units: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for unit, size in units:
        digest.update(f"{unit}\t{size}\n".encode())
    return digest.hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Ledger:
    """The work-unit ledger of one run, in Redis."""

    def __init__(self, client: redis.Redis, run_id: str, *, retry: RetryPolicy | None = None) -> None:
        self.client = client
        self.run_id = keys.check_run_id(run_id)
        self.retry = retry or RetryPolicy()
        self._keys = list(keys.ledger_keys(run_id).values())
        self._key = keys.ledger_keys(run_id)
        self._scripts = {
            name: client.register_script(_PRELUDE + body)
            for name, body in (
                ("init", _INIT), ("lease", _LEASE), ("renew", _RENEW),
                ("complete", _COMPLETE), ("release", _RELEASE), ("reclaim", _RECLAIM),
            )
        }

    def _run(self, name: str, *args: object) -> Any:
        script = self._scripts[name]
        try:
            return self.retry.call(self.client, f"ledger {name}", lambda: script(keys=self._keys, args=list(args)))
        except redis.ResponseError as exc:
            message = str(exc)
            for code, error in (("LEASE_LOST", LeaseLost), ("LEDGER_MISMATCH", LedgerError), ("BAD_OFFSET", LedgerError)):
                if code in message:
                    raise error(f"run {self.run_id}: {message.split(code, 1)[1].strip()}") from None
            raise

    # ------------------------------------------------------------------ setup

    def init_epoch(self, units: Mapping[str, int] | Iterable[tuple[str, int]]) -> bool:
        """Register the run's units (in training order) once; True if this call created the ledger.

        Calling again with the same units is a no-op; with different units it
        raises :class:`LedgerError` (a run's data must not change under it).
        """
        pairs = list(units.items()) if isinstance(units, Mapping) else list(units)
        if not pairs:
            raise ConfigError("init_epoch: no work units given")
        seen: set[str] = set()
        flat: list[object] = []
        for unit, size in pairs:
            if not unit or unit in seen:
                raise ConfigError(f"init_epoch: empty or duplicate unit id {unit!r}")
            if int(size) < 0:
                raise ConfigError(f"init_epoch: unit {unit!r} has negative size {size}")
            seen.add(unit)
            flat += [unit, int(size)]
        return bool(self._run("init", _fingerprint([(u, int(s)) for u, s in pairs]), *flat))

    # ----------------------------------------------------------------- leases

    def lease(self, trainer_id: str, ttl_s: float) -> Lease | None:
        """Lease the next unit (partly trained ones first), or None when none is leasable now.

        Expired leases are returned to the pool first. None means every unit is
        done or leased by someone else; ask again later.
        """
        if not trainer_id or "|" in trainer_id:
            raise ConfigError(f"trainer id {trainer_id!r} must be non-empty and contain no '|'")
        reply = self._run("lease", trainer_id, int(ttl_s * 1000))
        if not reply:
            return None
        unit, size, offset, token, expires, epoch = (_text(v) for v in reply)
        return Lease(unit, int(size), int(offset), trainer_id, int(token), int(expires), int(epoch))

    def renew(self, lease: Lease, ttl_s: float) -> Lease:
        """Extend the lease by ``ttl_s`` from now (Redis time); :class:`LeaseLost` if it was taken."""
        expires = self._run("renew", lease.unit, lease.owner, lease.trainer_id, lease.token, int(ttl_s * 1000))
        return Lease(lease.unit, lease.size, lease.offset, lease.trainer_id, lease.token, int(_text(expires)), lease.epoch)

    def complete(self, lease: Lease, tokens: int, round: int) -> bool:
        """Mark the unit trained to its end; True when this completed the epoch."""
        advanced, _dup = self._run(
            "complete", lease.unit, lease.owner, lease.trainer_id, lease.token, int(tokens), int(round)
        )
        return bool(advanced)

    def release_partial(self, lease: Lease, offset: int, tokens: int, round: int) -> bool:
        """Give the unit back, trained up to ``offset`` (absolute, within the unit).

        The next lease of the unit starts at ``offset``. An offset at or past the
        unit's size completes it. Returns True when this completed the epoch.
        """
        advanced, _dup = self._run(
            "release", lease.unit, lease.owner, lease.trainer_id, lease.token, int(tokens), int(round), int(offset)
        )
        return bool(advanced)

    def reclaim_expired(self) -> list[str]:
        """Return every expired lease's unit to the pool now; the reclaimed unit ids."""
        return [_text(u) for u in self._run("reclaim")]

    # ------------------------------------------------------------------ views

    def server_time_ms(self) -> int:
        seconds, micros = self.retry.call(self.client, "reading TIME", self.client.time)
        return int(seconds) * 1000 + int(micros) // 1000

    def leases(self) -> dict[str, tuple[str, int]]:
        """Current leases: unit -> (trainer id, ms until expiry by Redis time; negative = expired)."""
        now = self.server_time_ms()
        k = self._key

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrange(k[LedgerKey.LEASES], 0, -1, withscores=True)
            pipe.hgetall(k[LedgerKey.OWNER])
            return pipe.execute()

        expiries, owners = self.retry.call(self.client, "reading leases", read)
        return {
            _text(unit): (_text(owners.get(unit, b"?|")).split("|")[0], int(score) - now)
            for unit, score in expiries
        }

    def stats(self) -> LedgerStats:
        """A consistent snapshot (MULTI) of the ledger's counts and token totals."""
        k = self._key

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(k[LedgerKey.META])
            pipe.hlen(k[LedgerKey.UNITS])
            pipe.zcard(k[LedgerKey.PENDING])
            pipe.zcard(k[LedgerKey.LEASES])
            pipe.scard(k[LedgerKey.DONE])
            pipe.hlen(k[LedgerKey.CURSOR])
            pipe.hgetall(k[LedgerKey.TOKENS_BY_TRAINER])
            pipe.hgetall(k[LedgerKey.TOKENS_BY_ROUND])
            return pipe.execute()

        replies = self.retry.call(self.client, "reading ledger stats", read)
        meta, units, pending, leased, done, partial, by_trainer, by_round = replies
        meta = {_text(a): _text(b) for a, b in meta.items()}
        return LedgerStats(
            epoch=int(meta.get("epoch", 0)),
            units=units,
            pending=pending,
            leased=leased,
            done=done,
            partial=partial,
            tokens_total=int(meta.get("tokens_total", 0)),
            tokens_by_trainer={_text(t): int(n) for t, n in by_trainer.items()},
            tokens_by_round={int(_text(r)): int(n) for r, n in by_round.items()},
        )
