"""Consumer groups on a run's streams: at-least-once handling with dead-lettering.

A :class:`GroupConsumer` is one named member of a consumer group (e.g. the
coordinator's ``liveness`` group on the telemetry stream). Each :meth:`poll`:

1. claims entries another consumer (or this one) left un-acknowledged for
   longer than ``claim_idle_ms`` (XAUTOCLAIM) — the entries of a consumer that
   died, or whose handler failed — and handles them first;
2. reads new entries (XREADGROUP ``>``, optionally blocking);
3. calls the handler with each decoded :class:`~pilot.bus.streams.BusEntry`
   and XACKs it when the handler returns.

An entry that cannot be used — it fails to decode, has an unknown type, a
newer schema version or missing fields, or has already been delivered more
than ``max_deliveries`` times (the delivery count from XPENDING: a poison entry
whose handler keeps failing or crashing its consumer) — is copied to the run's
dead-letter stream with the reason and acknowledged, and the consumer goes on.

Handlers must be idempotent: an entry is redelivered if its consumer dies
between handling and XACK. ``claim_idle_ms`` must exceed the longest handler run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from pilot.bus.registry import as_text
from pilot.bus.streams import BLOCK_SLICE_S, Bus, BusEntry, dead_letter_fields
from pilot.keys import Stream
from pilot.log import get_logger

log = get_logger(__name__)

Handler = Callable[[BusEntry], None]

DEFAULT_CLAIM_IDLE_MS = 30_000
DEFAULT_MAX_DELIVERIES = 5


@dataclass
class PollResult:
    """What one :meth:`GroupConsumer.poll` did."""

    handled: int = 0  # handler returned, entry acked
    failed: int = 0  # handler raised, entry left pending (retried after claim_idle_ms)
    dead_lettered: int = 0
    claimed: int = 0  # entries taken over from idle pending lists


class GroupConsumer:
    """One member (``consumer``) of consumer group ``group`` on ``stream`` of ``bus``'s run."""

    def __init__(
        self,
        bus: Bus,
        stream: Stream,
        group: str,
        consumer: str,
        *,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        batch: int = 64,
        start_id: str = "0",
    ) -> None:
        if stream is Stream.DEADLETTER:
            raise ValueError("consume the dead-letter stream with Bus.replay, not a consumer group")
        self.bus, self.stream, self.group, self.consumer = bus, stream, group, consumer
        self.claim_idle_ms, self.max_deliveries, self.batch = claim_idle_ms, max_deliveries, batch
        self.start_id = start_id  # where a newly created group starts: "0" = whole history, "$" = new only
        self.key = bus.key(stream)
        self._group_ready = False
        self._claim_cursor = "0-0"
        self._last_error: dict[str, str] = {}

    # ----------------------------------------------------------------- setup

    def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; a no-op when it exists."""
        def create() -> None:
            try:
                self.bus.client.xgroup_create(self.key, self.group, id=self.start_id, mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.bus.call(f"creating group {self.group}", create)
        self._group_ready = True

    def _call(self, what: str, fn: Callable[[], object]) -> object:
        """A group command, recreating the group once if it vanished (NOGROUP)."""
        if not self._group_ready:
            self.ensure_group()
        try:
            return self.bus.call(what, fn)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return self.bus.call(what, fn)

    # --------------------------------------------------------------- polling

    def poll(self, handler: Handler, *, block_ms: int | None = None) -> PollResult:
        """Handle idle pending entries, then new ones (waiting up to ``block_ms`` if none)."""
        result = PollResult()
        for eid, fields in self._autoclaim():
            result.claimed += 1
            self._process(eid, fields, self._deliveries(eid), handler, result)
        wait = None if result.claimed else block_ms
        reply = self._call(
            "reading group",
            lambda: self.bus.client.xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=self.batch, block=wait
            ),
        )
        for _, items in reply or []:  # type: ignore[union-attr]
            for eid, fields in items:
                self._process(as_text(eid), fields, 1, handler, result)
        return result

    def run(self, handler: Handler, *, stop: threading.Event | None = None, block_ms: int = 2000) -> None:
        """Poll until ``stop`` is set (blocking reads of at most ``block_ms``)."""
        stop = stop or threading.Event()
        block_ms = min(block_ms, int(BLOCK_SLICE_S * 1000))
        while not stop.is_set():
            self.poll(handler, block_ms=block_ms)

    def pending(self) -> int:
        """Entries delivered to this group but not acknowledged (all consumers)."""
        info = self._call("reading pending", lambda: self.bus.client.xpending(self.key, self.group))
        return int(info["pending"])  # type: ignore[index]

    # -------------------------------------------------------------- internals

    def _autoclaim(self) -> list[tuple[str, dict[bytes, bytes]]]:
        reply = self._call(
            "claiming idle entries",
            lambda: self.bus.client.xautoclaim(
                self.key, self.group, self.consumer, self.claim_idle_ms, self._claim_cursor, count=self.batch
            ),
        )
        self._claim_cursor = as_text(reply[0])  # type: ignore[index]
        entries = reply[1]  # type: ignore[index]
        if any(eid is None for eid, _ in entries):
            self._ack_trimmed()
        return [(as_text(eid), fields) for eid, fields in entries if eid is not None]

    def _ack_trimmed(self) -> None:
        """Ack own pending entries that no longer exist (trimmed by MAXLEN)."""
        client = self.bus.client
        pending = self._call(
            "listing pending",
            lambda: client.xpending_range(self.key, self.group, "-", "+", self.batch, consumername=self.consumer),
        )
        for item in pending:  # type: ignore[union-attr]
            eid = as_text(item["message_id"])
            if not self.bus.call("checking entry", lambda: client.xrange(self.key, eid, eid)):
                self._call("acking trimmed entry", lambda: client.xack(self.key, self.group, eid))

    def _deliveries(self, eid: str) -> int:
        info = self._call(
            "reading delivery count",
            lambda: self.bus.client.xpending_range(self.key, self.group, eid, eid, 1, consumername=self.consumer),
        )
        return int(info[0]["times_delivered"]) if info else 1  # type: ignore[index]

    def _process(
        self, eid: str, fields: dict[bytes, bytes], deliveries: int, handler: Handler, result: PollResult
    ) -> None:
        entry = self.bus.entry(self.stream, eid, fields)
        if entry.error is not None:
            self._dead_letter(entry, str(entry.error))
            result.dead_lettered += 1
            return
        if deliveries > self.max_deliveries:
            last = self._last_error.get(eid, "no error recorded here (a consumer died while handling it?)")
            self._dead_letter(entry, f"delivered {deliveries} times (max {self.max_deliveries}); last error: {last}")
            result.dead_lettered += 1
            return
        try:
            handler(entry)
        except Exception as exc:  # noqa: BLE001 - any handler failure leaves the entry pending
            self._last_error[eid] = f"{type(exc).__name__}: {exc}"
            log.warning("bus.handler_failed", stream=self.stream.value, group=self.group, entry=eid,
                        type=entry.type, deliveries=deliveries, error=self._last_error[eid])
            result.failed += 1
            return
        self._call("acking", lambda: self.bus.client.xack(self.key, self.group, eid))
        self._last_error.pop(eid, None)
        result.handled += 1

    def _dead_letter(self, entry: BusEntry, reason: str) -> None:
        """Copy the entry to the dead-letter stream and ack it, atomically (MULTI)."""
        dl_fields = dead_letter_fields(self.stream, entry.entry_id, entry.fields, reason, self.group)
        dl_key = self.bus.key(Stream.DEADLETTER)

        def move() -> None:
            pipe = self.bus.client.pipeline(transaction=True)
            pipe.xadd(dl_key, dl_fields, maxlen=self.bus.maxlen(Stream.DEADLETTER), approximate=True)
            pipe.xack(self.key, self.group, entry.entry_id)
            pipe.execute()

        self._call("dead-lettering", move)
        self._last_error.pop(entry.entry_id, None)
        log.warning("bus.dead_lettered", stream=self.stream.value, group=self.group, entry=entry.entry_id,
                    type=entry.type, reason=reason)
