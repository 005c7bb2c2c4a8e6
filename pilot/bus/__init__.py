"""The event bus: protobuf events on Redis streams, per run.

- :mod:`pilot.bus.registry`   which events exist, their stream, the entry format
- :mod:`pilot.bus.connection` Redis clients, auth errors, bounded reconnects
- :mod:`pilot.bus.streams`    ``Bus``: publish, read/replay, watch for a round's stop
- :mod:`pilot.bus.consumer`   consumer groups: XACK, XAUTOCLAIM, dead-letter

Typical use::

    client = redis_client(url)                 # or resolve_redis() from pilot.redis_server
    bus = Bus(client, run_id)
    entry_id = bus.publish(RoundStarted(round=3, duration_s=600, participants=[...]))
    watcher = bus.stop_watcher(round=3, since_id=entry_id)   # trainer side
    if watcher.poll(): ...                                     # between steps
"""

from pilot.bus.connection import (
    REDIS_URL_ENV,
    RedisAuthError,
    RedisUnavailable,
    RetryPolicy,
    redact,
    redis_client,
)
from pilot.bus.consumer import GroupConsumer, Handler, PollResult
from pilot.bus.registry import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    DecodeError,
    EventType,
    InvalidEvent,
    decode,
    encode,
    event_type,
    unwrap,
    wrap,
)
from pilot.bus.streams import FIRST_ID, Bus, BusEntry, DeadLetter, StopWatcher, list_runs

__all__ = [
    "EVENT_TYPES",
    "FIRST_ID",
    "REDIS_URL_ENV",
    "SCHEMA_VERSION",
    "Bus",
    "BusEntry",
    "DeadLetter",
    "DecodeError",
    "EventType",
    "GroupConsumer",
    "Handler",
    "InvalidEvent",
    "PollResult",
    "RedisAuthError",
    "RedisUnavailable",
    "RetryPolicy",
    "StopWatcher",
    "decode",
    "encode",
    "event_type",
    "list_runs",
    "redact",
    "redis_client",
    "unwrap",
    "wrap",
]
