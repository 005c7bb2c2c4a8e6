"""The event registry: type names <-> protobuf classes, streams, and the entry format.

This is the one place that says which events exist, which stream each goes on,
and which fields each must carry. A stream entry has three fields::

    type   the message name, e.g. b"RoundStarted"
    v      the schema version the writer used, e.g. b"1"
    data   the serialized protobuf message

:func:`encode` fills ``schema_version`` and ``run_id`` and checks required
fields; :func:`decode` turns entry fields back into a message or raises
:class:`DecodeError` with a machine-readable ``code`` (unknown type, newer
version, malformed, missing fields, wrong run) that consumers dead-letter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from pilot.errors import PilotError
from pilot.keys import Stream
from pilot.v1 import events_pb2 as ev

SCHEMA_VERSION = 1
"""The pilot.v1 schema version this code writes and the newest it can read."""

FIELD_TYPE = b"type"
FIELD_VERSION = b"v"
FIELD_DATA = b"data"


class DecodeError(PilotError):
    """A stream entry that cannot be turned into a valid event."""

    UNKNOWN_TYPE = "unknown-type"
    NEWER_VERSION = "newer-version"
    MALFORMED = "malformed"
    MISSING_FIELDS = "missing-fields"
    WRONG_RUN = "wrong-run"

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class InvalidEvent(PilotError, ValueError):
    """A caller tried to publish an event that is unregistered or incomplete."""


@dataclass(frozen=True)
class EventType:
    """What the bus knows about one event message."""

    name: str  # message name, the entry's ``type`` field
    cls: type[Message]
    stream: Stream  # where publish() puts it
    required: tuple[str, ...]  # fields that must be set (non-default), beyond schema_version/run_id
    oneof_field: str  # its field in pilot.v1.Event's ``kind`` oneof


_ROUND_EVENT = ("round",)
_SPEC: tuple[tuple[type[Message], Stream, tuple[str, ...]], ...] = (
    (ev.RunStarted, Stream.CONTROL, ()),
    (ev.RoundStarted, Stream.CONTROL, _ROUND_EVENT),
    (ev.StopRound, Stream.CONTROL, _ROUND_EVENT),
    (ev.RoundClosed, Stream.CONTROL, _ROUND_EVENT),
    # round 0 is the run's initial weights: checkpointed and evaluated like any round
    (ev.CheckpointPublished, Stream.CONTROL, ("uri", "sha256")),
    (ev.EvalCompleted, Stream.CONTROL, ("status",)),
    (ev.UpdateRejected, Stream.CONTROL, ("trainer_id", "round", "reason")),
    (ev.RunStopped, Stream.CONTROL, ()),
    (ev.TrainerHeartbeat, Stream.TELEMETRY, ("trainer_id",)),
    (ev.TrainerProgress, Stream.TELEMETRY, ("trainer_id", "round")),
)
_ENVELOPE_FIELDS = ("schema_version", "run_id")


def _oneof_fields() -> dict[str, str]:
    """Message name -> field name in pilot.v1.Event's oneof."""
    kind = ev.Event.DESCRIPTOR.oneofs_by_name["kind"]
    return {f.message_type.name: f.name for f in kind.fields}


def _build() -> dict[str, EventType]:
    oneof = _oneof_fields()
    table: dict[str, EventType] = {}
    for cls, stream, required in _SPEC:
        name = cls.DESCRIPTOR.name
        table[name] = EventType(name, cls, stream, required, oneof[name])
    return table


EVENT_TYPES: Mapping[str, EventType] = _build()
_BY_CLASS: Mapping[type[Message], EventType] = {t.cls: t for t in EVENT_TYPES.values()}


def event_type(event: Message | type[Message]) -> EventType:
    """The registry entry of an event message or class."""
    cls = event if isinstance(event, type) else type(event)
    try:
        return _BY_CLASS[cls]
    except KeyError:
        raise InvalidEvent(f"{cls.__name__} is not a registered event (see pilot/bus/registry.py)") from None


def missing_fields(event: Message) -> list[str]:
    """Required fields (envelope + the type's own) that are unset in ``event``."""
    present = {f.name for f, _ in event.ListFields()}
    wanted = _ENVELOPE_FIELDS + event_type(event).required
    return [name for name in wanted if name not in present]


def encode(event: Message, run_id: str) -> dict[bytes, bytes]:
    """Entry fields for ``event``: fills schema_version/run_id, checks required fields."""
    etype = event_type(event)
    msg_run = getattr(event, "run_id")
    if msg_run and msg_run != run_id:
        raise InvalidEvent(f"{etype.name} has run_id {msg_run!r} but is published on run {run_id!r}")
    if not msg_run:
        setattr(event, "run_id", run_id)
    if not getattr(event, "schema_version"):
        setattr(event, "schema_version", SCHEMA_VERSION)
    missing = missing_fields(event)
    if missing:
        raise InvalidEvent(f"{etype.name} is missing required field(s): {', '.join(missing)}")
    return {
        FIELD_TYPE: etype.name.encode(),
        FIELD_VERSION: str(SCHEMA_VERSION).encode(),
        FIELD_DATA: event.SerializeToString(),
    }


def as_text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def decode(fields: Mapping[bytes, bytes], run_id: str | None = None) -> Message:
    """The event in an entry's fields; raises :class:`DecodeError` when it is not valid.

    With ``run_id`` given, an event of another run is rejected too.
    """
    absent = [f.decode() for f in (FIELD_TYPE, FIELD_VERSION, FIELD_DATA) if f not in fields]
    if absent:
        raise DecodeError(DecodeError.MISSING_FIELDS, f"entry lacks field(s) {', '.join(absent)}")
    name = as_text(fields[FIELD_TYPE])
    etype = EVENT_TYPES.get(name)
    if etype is None:
        raise DecodeError(DecodeError.UNKNOWN_TYPE, f"unknown event type {name!r}")
    try:
        version = int(as_text(fields[FIELD_VERSION]))
    except ValueError:
        raw = as_text(fields[FIELD_VERSION])
        raise DecodeError(DecodeError.MALFORMED, f"{name}: schema version {raw!r} is not an integer") from None
    if version > SCHEMA_VERSION:
        raise DecodeError(DecodeError.NEWER_VERSION, f"{name} v{version} is newer than this reader (v{SCHEMA_VERSION})")
    if version < 1:
        raise DecodeError(DecodeError.MALFORMED, f"{name}: schema version {version} < 1")
    event = etype.cls()
    try:
        event.ParseFromString(fields[FIELD_DATA])
    except ProtobufDecodeError as exc:
        raise DecodeError(DecodeError.MALFORMED, f"{name}: data is not a valid {name} message ({exc})") from None
    if (inner := getattr(event, "schema_version")) > SCHEMA_VERSION:
        raise DecodeError(DecodeError.NEWER_VERSION, f"{name} message says schema v{inner}, newer than v{SCHEMA_VERSION}")
    missing = missing_fields(event)
    if missing:
        raise DecodeError(DecodeError.MISSING_FIELDS, f"{name} lacks required field(s) {', '.join(missing)}")
    if run_id is not None and getattr(event, "run_id") != run_id:
        raise DecodeError(DecodeError.WRONG_RUN, f"{name} belongs to run {getattr(event, 'run_id')!r}, not {run_id!r}")
    return event


def wrap(event: Message, entry_id: str = "", stream: str = "") -> ev.Event:
    """``event`` inside a pilot.v1.Event (the oneof used by WatchEvents)."""
    out = ev.Event(entry_id=entry_id, stream=stream)
    getattr(out, event_type(event).oneof_field).CopyFrom(event)
    return out


def unwrap(wrapped: ev.Event) -> Message:
    """The event inside a pilot.v1.Event."""
    field = wrapped.WhichOneof("kind")
    if field is None:
        raise DecodeError(DecodeError.MISSING_FIELDS, "Event has no event set")
    return getattr(wrapped, field)
