"""The event registry: every event type encodes, decodes, and bad entries are named.

``sample_events()`` (one valid, fully filled event of every type) is reused by
the integration tests of the bus.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from pilot.bus import EVENT_TYPES, SCHEMA_VERSION, DecodeError, InvalidEvent, decode, encode, unwrap, wrap
from pilot.keys import Stream
from pilot.v1 import events_pb2 as ev

RUN = "run-1"


def sample_events() -> list[Message]:
    """One valid event of every registered type (in registry order)."""
    return [
        ev.RunStarted(model="d4", strategy="diloco", min_trainers=2, num_rounds=3, round_duration_s=60),
        ev.RoundStarted(round=1, duration_s=60.0, round_steps=0, participants=["t0", "t1"], reply_timeout_s=30),
        ev.StopRound(round=1, reason=ev.STOP_REASON_OPERATOR, detail="enough", requested_by="cli"),
        ev.RoundClosed(round=1, trainers=["t0"], tokens=12345, valid_updates=1, rejected_updates=1, wall_s=61.5,
                       mean_loss=3.2, weights_changed=True),
        ev.CheckpointPublished(round=1, uri="/runs/r/ckpt_0001.safetensors", sha256="ab" * 32, tokens=12345,
                               size_bytes=1 << 20),
        ev.EvalCompleted(round=1, bpb=1.23, tokens=4096, sample="To be", status=ev.EVAL_STATUS_OK,
                         checkpoint_sha256="ab" * 32, eval_s=2.5),
        ev.UpdateRejected(trainer_id="t1", round=1, reason="non-finite delta in wte"),
        ev.RunStopped(reason=ev.STOP_REASON_COMPLETED, detail="3 rounds", last_round=3),
        ev.TrainerHeartbeat(trainer_id="t0", node_id="123", round=1, state=ev.TRAINER_STATE_TRAINING,
                            num_devices=1, device="cpu"),
        ev.TrainerProgress(trainer_id="t0", round=1, step=10, tokens=5120, tokens_per_s=1700.0, loss=3.5,
                           elapsed_s=3.0),
    ]


def test_registry_covers_every_event_of_the_event_oneof() -> None:
    oneof = ev.Event.DESCRIPTOR.oneofs_by_name["kind"]
    assert {f.message_type.name for f in oneof.fields} == set(EVENT_TYPES)
    assert [type(e).__name__ for e in sample_events()] == list(EVENT_TYPES)
    assert {t.name for t in EVENT_TYPES.values() if t.stream is Stream.TELEMETRY} == {"TrainerHeartbeat", "TrainerProgress"}


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
def test_encode_decode_round_trip(event: Message) -> None:
    fields = encode(event, RUN)
    assert fields[b"type"] == type(event).__name__.encode()
    assert fields[b"v"] == str(SCHEMA_VERSION).encode()
    back = decode(fields, RUN)
    assert back == event and back.run_id == RUN and back.schema_version == SCHEMA_VERSION
    assert unwrap(wrap(back, "1-0", "control")) == event


def _fields(event: Message) -> dict[bytes, bytes]:
    return encode(event, RUN)


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda f: f.update({b"type": b"Nope"}), DecodeError.UNKNOWN_TYPE),
        (lambda f: f.update({b"v": b"2"}), DecodeError.NEWER_VERSION),
        (lambda f: f.update({b"v": b"x"}), DecodeError.MALFORMED),
        (lambda f: f.update({b"data": b"\xff\xff\xff"}), DecodeError.MALFORMED),
        (lambda f: f.pop(b"data"), DecodeError.MISSING_FIELDS),
        (lambda f: f.update({b"data": ev.StopRound(schema_version=1, run_id=RUN).SerializeToString()}),
         DecodeError.MISSING_FIELDS),
        (lambda f: f.update({b"data": ev.StopRound(schema_version=9, run_id=RUN, round=1).SerializeToString()}),
         DecodeError.NEWER_VERSION),
        (lambda f: f.update({b"data": ev.StopRound(schema_version=1, run_id="other", round=1).SerializeToString()}),
         DecodeError.WRONG_RUN),
    ],
    ids=["unknown-type", "newer-v", "bad-v", "garbage", "no-data", "no-round", "newer-msg", "other-run"],
)
def test_bad_entries_raise_decode_error_with_code(mutate, code: str) -> None:  # type: ignore[no-untyped-def]
    fields = _fields(ev.StopRound(round=1))
    mutate(fields)
    with pytest.raises(DecodeError) as info:
        decode(fields, RUN)
    assert info.value.code == code


def test_publishing_an_incomplete_or_foreign_event_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="round"):
        encode(ev.RoundStarted(duration_s=1), RUN)
    with pytest.raises(InvalidEvent, match="other"):
        encode(ev.StopRound(round=1, run_id="other"), RUN)
    with pytest.raises(InvalidEvent, match="not a registered event"):
        encode(ev.Event(), RUN)
