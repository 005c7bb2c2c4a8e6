"""Reading the event log back: torn last lines, corrupt lines, resume cursors (no Redis needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pilot.errors import DataError
from pilot.eventlog import _repair_tail, event_log_path, id_key, last_ids, read_event_log
from pilot.keys import Stream

LINES = [
    {"stream": "control", "id": "1700000000000-0", "type": "RoundStarted", "event": {"round": 1}},
    {"stream": "telemetry", "id": "1700000000005-3", "type": "TrainerProgress", "event": {"round": 1}},
    {"stream": "control", "id": "1700000000010-0", "type": "Bogus", "error": "unknown-type: 'Bogus'"},
    {"stream": "telemetry", "id": "1700000000005-12", "type": "TrainerProgress", "event": {"round": 1}},
]


def write(path: Path, tail: str = "") -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES) + tail)


def test_read_back_and_cursors(tmp_path: Path) -> None:
    path = event_log_path(tmp_path)
    write(path)
    assert read_event_log(path) == LINES
    assert last_ids(LINES) == {Stream.CONTROL: "1700000000010-0", Stream.TELEMETRY: "1700000000005-12"}
    assert last_ids([]) == {Stream.CONTROL: "0-0", Stream.TELEMETRY: "0-0"}
    assert id_key("1700000000005-12") > id_key("1700000000005-3")  # numeric, not text, order


def test_a_torn_last_line_is_ignored_and_cut(tmp_path: Path) -> None:
    path = event_log_path(tmp_path)
    write(path, tail='{"stream": "control", "id": "17000')
    assert read_event_log(path) == LINES
    _repair_tail(path)
    assert path.read_text().endswith("}\n") and read_event_log(path) == LINES
    _repair_tail(path)  # nothing to cut
    assert len(path.read_text().splitlines()) == len(LINES)


def test_corrupt_or_missing_logs_are_named(tmp_path: Path) -> None:
    path = event_log_path(tmp_path)
    path.write_text(json.dumps(LINES[0]) + "\nnot json\n" + json.dumps(LINES[1]) + "\n")
    with pytest.raises(DataError, match=r"events.jsonl line 2 is not a JSON object"):
        read_event_log(path)
    assert read_event_log(path, strict=False) == LINES[:2]  # what the writer and the report read
    with pytest.raises(DataError, match=r"event log .*nope.jsonl does not exist"):
        read_event_log(tmp_path / "nope.jsonl")
