"""The run's event log: ``<run_dir>/events.jsonl``, a durable copy of its control and telemetry streams.

One JSON object per line, per stream entry, in Redis entry-id order within each batch::

    {"stream": "control", "id": "1700000000000-0", "type": "RoundClosed",
     "event": {...MessageToDict(event, preserving_proto_field_name=True)...}}

and, for an entry that does not decode (unknown type, newer schema, garbage),
``{"stream", "id", "type", "error"}`` with the reason instead of ``"event"``.
(MessageToDict leaves out fields at their default value and writes 64-bit
integers as strings; readers use ``int(event.get("tokens", 0))``.)

:class:`EventLogWriter` tails the run's streams into the file. It starts after
the last id of each stream already in the file (so a restarted writer never
writes a line twice; a half-written last line left by a crash is cut off
first), appends one batch at a time and flushes after each. ``run(stop)``
loops until the ``threading.Event`` is set, then drains what is left; ``start()``
runs that in a daemon thread and ``stop()`` ends it. ``pilot run`` starts one
for the run and stops it before writing the report.

Telemetry is capped in Redis (``MAXLEN ~``): entries trimmed before the writer
read them are not in the file. Control events are never trimmed.

:func:`read_event_log` parses the file back (skipping a torn last line; ``strict=False``
also skips corrupt lines, with a warning).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from pilot.bus import FIRST_ID, Bus, BusEntry, RedisUnavailable
from pilot.errors import DataError
from pilot.keys import Stream
from pilot.log import get_logger

log = get_logger(__name__)

EVENT_LOG_NAME = "events.jsonl"
LOGGED_STREAMS: tuple[Stream, ...] = (Stream.CONTROL, Stream.TELEMETRY)
DEFAULT_BATCH = 500
DEFAULT_POLL_S = 1.0
ERROR_BACKOFF_S = 2.0


def event_log_path(run_dir: str | Path) -> Path:
    """``<run_dir>/events.jsonl``."""
    return Path(run_dir) / EVENT_LOG_NAME


def id_key(entry_id: str) -> tuple[int, int]:
    """A Redis entry id ("<ms>-<seq>") as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_record(entry: BusEntry) -> dict[str, Any]:
    """The log line's object for one stream entry."""
    from google.protobuf.json_format import MessageToDict

    record: dict[str, Any] = {"stream": entry.stream.value, "id": entry.entry_id, "type": entry.type}
    if entry.event is not None:
        record["event"] = MessageToDict(entry.event, preserving_proto_field_name=True)
    else:
        record["error"] = str(entry.error) if entry.error is not None else "undecodable entry"
    return record


def _parse_lines(text: str, path: Path, strict: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if number == len(lines):  # a torn last line (crash mid-write): ignore it
                log.warning("ignoring a torn last line", path=str(path), line=number)
                continue
            if not strict:
                log.warning("skipping a corrupt event-log line", path=str(path), line=number, error=str(exc))
                continue
            raise DataError(f"event log {path} line {number} is not a JSON object: {exc}") from None
        records.append(record)
    return records


def read_event_log(path: str | Path, *, strict: bool = True) -> list[dict[str, Any]]:
    """Every record of an event log, in file order.

    Raises DataError when the file is missing, or (``strict``) when a line other
    than a torn last one is not a JSON object; with ``strict=False`` such lines
    are skipped with a warning (the writer and the report read that way).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"event log {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read event log {path}: {exc}") from exc
    return _parse_lines(text, path, strict)


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line (no trailing newline) so appends start on a fresh line."""
    with open(path, "rb+") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        position = size
        while position > 0:
            step = min(65536, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(position - step + newline + 1)
                log.warning("cut a torn last line from the event log", path=str(path))
                return
            position -= step
        handle.truncate(0)


def last_ids(records: Iterable[dict[str, Any]]) -> dict[Stream, str]:
    """The newest entry id per logged stream among ``records`` ("0-0" for a stream with none)."""
    cursors = {stream: FIRST_ID for stream in LOGGED_STREAMS}
    for record in records:
        try:
            stream, entry_id = Stream(record["stream"]), str(record["id"])
            if stream in cursors and id_key(entry_id) > id_key(cursors[stream]):
                cursors[stream] = entry_id
        except (KeyError, ValueError):
            continue
    return cursors


class EventLogWriter:
    """Appends a run's control and telemetry entries to its event log (see the module docstring)."""

    def __init__(self, bus: Bus, path: str | Path, *, batch: int = DEFAULT_BATCH) -> None:
        self.bus = bus
        self.path = Path(path)
        self.batch = batch
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _repair_tail(self.path)
            self.cursors = last_ids(read_event_log(self.path, strict=False))
        else:
            self.cursors = {stream: FIRST_ID for stream in LOGGED_STREAMS}
        self.written = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: TextIO | None = None

    def _file(self) -> TextIO:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8", newline="\n")
        return self._handle

    def poll(self, block_ms: int | None = None) -> int:
        """Append one batch of new entries (waiting up to ``block_ms`` for some); returns lines written."""
        entries = self.bus.read_streams(self.cursors, count=self.batch, block_ms=block_ms)
        if not entries:
            return 0
        entries.sort(key=lambda e: id_key(e.entry_id))
        handle = self._file()
        handle.write("".join(json.dumps(entry_record(e), ensure_ascii=False) + "\n" for e in entries))
        handle.flush()
        for entry in entries:
            if id_key(entry.entry_id) > id_key(self.cursors[entry.stream]):
                self.cursors[entry.stream] = entry.entry_id
        self.written += len(entries)
        return len(entries)

    def drain(self) -> int:
        """Append everything published so far; returns lines written."""
        total = 0
        while (count := self.poll()) > 0:
            total += count
        return total

    def run(self, stop: threading.Event, poll_s: float = DEFAULT_POLL_S) -> None:
        """Tail until ``stop`` is set, then drain and close. Redis outages are logged and waited out."""
        block_ms = max(1, int(poll_s * 1000))
        try:
            while not stop.is_set():
                try:
                    self.poll(block_ms=block_ms)
                except (RedisUnavailable, OSError) as exc:  # Redis restarting, disk full: keep trying
                    log.warning("event log: cannot copy events, will retry", path=str(self.path), error=str(exc))
                    stop.wait(ERROR_BACKOFF_S)
            try:
                self.drain()
            except (RedisUnavailable, OSError) as exc:
                log.warning("event log: final drain failed", path=str(self.path), error=str(exc))
        finally:
            self.close()

    def start(self, poll_s: float = DEFAULT_POLL_S) -> threading.Thread:
        """Run :meth:`run` in a daemon thread; :meth:`stop` ends it."""
        if self._thread is not None and self._thread.is_alive():
            return self._thread
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop, poll_s), name="event-log", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread started by :meth:`start` after a final drain."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("event log writer did not stop in time", path=str(self.path), timeout_s=timeout_s)
            self._thread = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> EventLogWriter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
