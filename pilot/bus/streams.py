"""The event bus of one run: publish events, read and replay streams, watch for stops.

``Bus(client, run_id)`` publishes registered events (pilot/bus/registry.py) on
the run's streams with XADD and returns the Redis entry id, which is the
event's identity and order. Control events are kept whole; telemetry is capped
with ``MAXLEN ~``; the dead-letter stream keeps what consumers could not use.

Reading does not need a consumer group: :meth:`Bus.read` / :meth:`Bus.replay`
give every entry after an id (XREAD / XRANGE), decoded, with entries that do
not decode reported as such instead of raising. :class:`StopWatcher` is what a
trainer uses: it reads the control stream from the round's ``RoundStarted``
entry onward, so a ``StopRound`` published before the trainer looked is still
seen (pub/sub would have lost it).

Every Redis call goes through a :class:`RetryPolicy`: a restarting Redis is
retried with backoff, and after the bound a :class:`RedisUnavailable` is raised.
Publishing is at-least-once: an XADD retried after a lost reply may add the
event twice, so readers must tolerate duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import redis
from google.protobuf.message import Message

from pilot import keys
from pilot.bus.connection import RetryPolicy
from pilot.bus.registry import FIELD_TYPE, DecodeError, as_text, decode, encode, event_type
from pilot.keys import Stream
from pilot.v1 import events_pb2 as ev

DEFAULT_TELEMETRY_MAXLEN = 100_000
"""Telemetry entries kept per run (approximate trim): ~ a day of 10 trainers at 1 Hz."""
DEFAULT_DEADLETTER_MAXLEN = 10_000
BLOCK_SLICE_S = 5.0
"""Longest single XREAD BLOCK; well below the client's socket timeout."""
T = TypeVar("T")
FIRST_ID = "0-0"
READ_PAGE = 500

# Dead-letter entries keep the original fields and add these.
DL_SOURCE = b"dl:stream"
DL_SOURCE_ID = b"dl:id"
DL_GROUP = b"dl:group"
DL_REASON = b"dl:reason"


@dataclass(frozen=True)
class DeadLetter:
    """Why an entry was dead-lettered, and where it came from."""

    source_stream: str
    source_id: str
    group: str
    reason: str


@dataclass(frozen=True)
class BusEntry:
    """One stream entry, decoded when possible."""

    entry_id: str
    stream: Stream
    type: str  # the entry's ``type`` field ("" when absent)
    event: Message | None  # the decoded event; None when it did not decode
    error: DecodeError | None  # why it did not decode
    fields: Mapping[bytes, bytes]  # the raw entry
    dead_letter: DeadLetter | None = None  # set on dead-letter stream entries

    @property
    def ok(self) -> bool:
        return self.event is not None


def list_runs(client: redis.Redis, retry: RetryPolicy | None = None) -> list[tuple[str, float]]:
    """Runs that published ``RunStarted``: (run id, unix time of its first start), oldest first."""
    rows = (retry or RetryPolicy()).call(client, "listing runs", lambda: client.zrange(keys.RUNS, 0, -1, withscores=True))
    return [(as_text(run), float(score)) for run, score in rows]


class Bus:
    """Publish and read the event streams of one run."""

    def __init__(
        self,
        client: redis.Redis,
        run_id: str,
        *,
        telemetry_maxlen: int = DEFAULT_TELEMETRY_MAXLEN,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.run_id = keys.check_run_id(run_id)
        self.telemetry_maxlen = telemetry_maxlen
        self.retry = retry or RetryPolicy()

    def key(self, stream: Stream | str) -> str:
        return keys.stream(self.run_id, stream)

    def maxlen(self, stream: Stream) -> int | None:
        return {Stream.TELEMETRY: self.telemetry_maxlen, Stream.DEADLETTER: DEFAULT_DEADLETTER_MAXLEN}.get(stream)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a Redis call under the bus's retry policy."""
        return self.retry.call(self.client, what, fn)

    # ------------------------------------------------------------------ writing

    def publish(self, event: Message) -> str:
        """Append ``event`` to its stream; returns the Redis entry id.

        Publishing ``RunStarted`` also records the run in the run registry
        (``pilot:runs``, scored by the entry's Redis time) if it is not there yet.
        """
        stream = event_type(event).stream
        key, maxlen, fields = self.key(stream), self.maxlen(stream), encode(event, self.run_id)
        what = f"publishing {type(event).__name__}"
        entry_id = as_text(self.call(what, lambda: self.client.xadd(key, fields, maxlen=maxlen, approximate=True)))
        if isinstance(event, ev.RunStarted):
            created = int(entry_id.split("-", 1)[0]) / 1000
            self.call("registering run", lambda: self.client.zadd(keys.RUNS, {self.run_id: created}, nx=True))
        return entry_id

    # ------------------------------------------------------------------ reading

    def entry(self, stream: Stream, entry_id: bytes | str, fields: Mapping[bytes, bytes] | None) -> BusEntry:
        """Decode one raw entry (never raises for bad content)."""
        fields = fields or {}
        if stream is Stream.DEADLETTER:
            dead = DeadLetter(*(as_text(fields.get(k)) for k in (DL_SOURCE, DL_SOURCE_ID, DL_GROUP, DL_REASON)))
            return BusEntry(as_text(entry_id), stream, as_text(fields.get(FIELD_TYPE)), None, None, fields, dead)
        try:
            event: Message | None = decode(fields, self.run_id)
            error = None
        except DecodeError as exc:
            event, error = None, exc
        return BusEntry(as_text(entry_id), stream, as_text(fields.get(FIELD_TYPE)), event, error, fields)

    def read(
        self, stream: Stream = Stream.CONTROL, after: str = FIRST_ID, *, count: int = READ_PAGE, block_ms: int | None = None
    ) -> list[BusEntry]:
        """Entries after ``after`` (exclusive), at most ``count``; blocks up to ``block_ms`` when none."""
        return self.read_streams({stream: after}, count=count, block_ms=block_ms)

    def read_streams(
        self, cursors: Mapping[Stream, str], *, count: int = READ_PAGE, block_ms: int | None = None
    ) -> list[BusEntry]:
        """Like :meth:`read` for several streams at once (XREAD), each after its own id."""
        by_key = {self.key(s): s for s in cursors}
        query = {self.key(s): after for s, after in cursors.items()}
        reply = self.call("reading streams", lambda: self.client.xread(query, count=count, block=block_ms))
        return [
            self.entry(by_key[as_text(key)], eid, fields) for key, items in (reply or []) for eid, fields in items
        ]

    def replay(self, stream: Stream = Stream.CONTROL, after: str = FIRST_ID, *, page: int = 500) -> Iterator[BusEntry]:
        """Every entry after ``after`` (exclusive) up to now, in order (XRANGE pages)."""
        key = self.key(stream)
        cursor = after
        while True:
            start = "-" if cursor in ("0", FIRST_ID, "-") else f"({cursor}"
            items = self.call(f"replaying {stream.value}", lambda: self.client.xrange(key, start, "+", count=page))
            for eid, fields in items:
                yield self.entry(stream, eid, fields)
            if len(items) < page:
                return
            cursor = as_text(items[-1][0])

    def last_id(self, stream: Stream = Stream.CONTROL) -> str:
        """Id of the newest entry ("0-0" when the stream is empty)."""
        key = self.key(stream)
        items = self.call("reading last id", lambda: self.client.xrevrange(key, "+", "-", count=1))
        return as_text(items[0][0]) if items else FIRST_ID

    def length(self, stream: Stream = Stream.CONTROL) -> int:
        key = self.key(stream)
        return int(self.call("reading length", lambda: self.client.xlen(key)))

    def find_round_started(self, round: int) -> str | None:
        """Entry id of the newest ``RoundStarted`` for ``round`` (scanning backwards), or None."""
        key, cursor = self.key(Stream.CONTROL), "+"
        while True:
            items = self.call("finding RoundStarted", lambda: self.client.xrevrange(key, cursor, "-", count=200))
            for eid, fields in items:
                if fields.get(FIELD_TYPE) == b"RoundStarted":
                    found = self.entry(Stream.CONTROL, eid, fields)
                    if isinstance(found.event, ev.RoundStarted) and found.event.round == round:
                        return found.entry_id
            if len(items) < 200:
                return None
            cursor = f"({as_text(items[-1][0])}"

    # ------------------------------------------------------------- round stops

    def stop_watcher(self, round: int, since_id: str) -> StopWatcher:
        """A watcher for ``StopRound{round}`` in control entries after ``since_id``."""
        return StopWatcher(self, round, since_id)

    def find_stop(self, round: int, since_id: str) -> ev.StopRound | None:
        """The first ``StopRound{round}`` after ``since_id``, or None (non-blocking)."""
        return self.stop_watcher(round, since_id).poll()

    def wait_stop(self, round: int, since_id: str, timeout_s: float) -> ev.StopRound | None:
        """Like :meth:`find_stop` but waits up to ``timeout_s`` for one to arrive."""
        return self.stop_watcher(round, since_id).wait(timeout_s)


class StopWatcher:
    """Incremental reader of the control stream looking for one round's stop.

    ``poll()`` is cheap (one non-blocking XREAD from where it left off); call it
    between training steps. ``wait(timeout_s)`` blocks until a stop or timeout.
    """

    def __init__(self, bus: Bus, round: int, since_id: str) -> None:
        self.bus, self.round, self.cursor = bus, round, since_id or FIRST_ID
        self.stop: ev.StopRound | None = None

    def _scan(self, block_ms: int | None) -> ev.StopRound | None:
        while self.stop is None:
            entries = self.bus.read(Stream.CONTROL, self.cursor, block_ms=block_ms)
            for entry in entries:
                self.cursor = entry.entry_id
                if isinstance(entry.event, ev.StopRound) and entry.event.round == self.round:
                    self.stop = entry.event
                    break
            if len(entries) < READ_PAGE or block_ms is not None:
                break
        return self.stop

    def poll(self) -> ev.StopRound | None:
        """The stop if it has been published, else None, without waiting."""
        return self._scan(None)

    def wait(self, timeout_s: float) -> ev.StopRound | None:
        """The stop, waiting up to ``timeout_s`` seconds for it; None on timeout."""
        deadline = time.monotonic() + timeout_s
        if self.poll() is not None:
            return self.stop
        while (remaining := deadline - time.monotonic()) > 0:
            block_ms = max(1, int(min(remaining, BLOCK_SLICE_S) * 1000))
            if self._scan(block_ms) is not None:
                return self.stop
        return None


def dead_letter_fields(
    source: Stream, entry_id: str, fields: Mapping[bytes, bytes], reason: str, group: str
) -> dict[bytes, bytes]:
    """The fields of a dead-letter entry: the original ones plus where/why."""
    out = dict(fields)
    out.update(
        {
            DL_SOURCE: source.value.encode(),
            DL_SOURCE_ID: entry_id.encode(),
            DL_GROUP: group.encode(),
            DL_REASON: reason.encode(),
        }
    )
    return out

