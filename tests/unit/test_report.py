"""The run report from an event log written by hand: table, plots (real PNGs), sample, missing pieces."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from typer.testing import CliRunner

from pilot.cli import app as cli
from pilot.errors import DataError
from pilot.report import write_report
from pilot.report.summary import summarize
from pilot.v1 import events_pb2 as ev

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STREAMS = {"TrainerProgress": "telemetry", "TrainerHeartbeat": "telemetry"}


def record(event: Message, index: int) -> dict[str, Any]:
    """One event-log line, as pilot.eventlog writes it."""
    event.run_id, event.schema_version = "run-a", 1  # type: ignore[attr-defined]
    kind = type(event).__name__
    return {"stream": STREAMS.get(kind, "control"), "id": f"{1000 + index}-0", "type": kind,
            "event": MessageToDict(event, preserving_proto_field_name=True)}


def write_log(run_dir: Path, events: list[Message], extra: Sequence[dict[str, Any]] = ()) -> None:
    lines = [json.dumps(record(e, i)) for i, e in enumerate(events)] + [json.dumps(x) for x in extra]
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n")


def three_rounds() -> list[Message]:
    events: list[Message] = [
        ev.RunStarted(model="d2", strategy="fedavg", num_rounds=4),
        ev.CheckpointPublished(round=0, uri="/x/round_0", sha256="ef" * 32),  # the initial weights
        ev.EvalCompleted(round=0, bpb=8.05, tokens=4096, status=ev.EVAL_STATUS_OK, sample="noise"),
    ]
    for r in (1, 2, 3):
        events.append(ev.RoundStarted(round=r, duration_s=20, participants=["a", "b"]))
        for trainer, tokens in (("a", 3000), ("b", 1000 * r)):
            for step in (1, 2, 3):
                events.append(ev.TrainerProgress(trainer_id=trainer, round=r, step=step, tokens=tokens * step // 3,
                                                 loss=4.0 - 0.3 * r - 0.1 * step, elapsed_s=6.0 * step))
        events.append(ev.RoundClosed(round=r, trainers=["a", "b"], tokens=3000 + 1000 * r, valid_updates=2,
                                     wall_s=21.5, mean_loss=3.5 - 0.3 * r))
        events.append(ev.CheckpointPublished(round=r, uri=f"/x/round_{r}", sha256="cd" * 32, tokens=5000 * r))
    events.append(ev.EvalCompleted(round=1, bpb=3.25, tokens=4096, status=ev.EVAL_STATUS_OK, sample="early text"))
    events.append(ev.EvalCompleted(round=2, status=ev.EVAL_STATUS_FAILED, failed_reason="tokenizer missing"))
    events.append(ev.EvalCompleted(round=3, bpb=2.75, tokens=4096, status=ev.EVAL_STATUS_OK,
                                   sample="Thou art ```fenced``` text"))
    events.append(ev.UpdateRejected(trainer_id="b", round=2, reason="non-finite update"))
    return events


def test_full_report_has_table_plots_and_sample(tmp_path: Path) -> None:
    write_log(tmp_path, three_rounds(), extra=[{"stream": "control", "id": "9999-0", "type": "Bogus", "error": "x"}])
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    assert "# Pilot run report: run-a" in text and "| rounds closed | 3 of 4 planned |" in text
    assert "| round | tokens | total tokens | trainers | mean train loss | val BPB | wall s |" in text
    assert "| 0 | – | 0 | – | – | 8.0500 | – |" in text
    assert "| 1 | 4,000 | 5,000 | 2 | 3.2000 | 3.2500 | 21.5 |" in text
    assert "| 2 | 5,000 | 10,000 | 2 | 2.9000 | failed | 21.5 |" in text
    assert "| 3 | 6,000 | 15,000 | 2 | 2.6000 | 2.7500 | 21.5 |" in text
    assert "| latest val BPB | 2.7500 (round 3) |" in text
    assert "````text\nThou art ```fenced``` text\n````" in text  # a fence longer than the sample's backticks
    assert "Evaluation of round 2 failed: tokenizer missing" in text
    assert "Update of b in round 2 rejected: non-finite update" in text
    assert "1 event-log entries could not be decoded" in text

    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["round_timing.png", "tokens_per_trainer.png", "train_loss.png", "val_bpb.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(png)
        assert image.shape[0] >= 300 and image.shape[1] >= 600 and image.std() > 0.01  # a drawn figure
        assert f"](plots/{png.name})" in text


def test_missing_pieces_are_said_not_fatal(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "No event log at" in text and "No rounds in the event log yet." in text
    assert "No evaluation results yet, so no text sample." in text
    assert "_Not drawn: no evaluation results yet._" in text
    assert not list((empty / "plots").glob("*.png"))

    partial = tmp_path / "partial"
    partial.mkdir()
    write_log(partial, three_rounds()[:1] + three_rounds()[3:10])  # round 1 running: progress only, nothing closed or evaluated
    text = write_report(partial).read_text()
    assert "| latest val BPB | no evaluation results yet |" in text
    assert "| 1 | – | – | 2 | " in text
    assert sorted(p.name for p in (partial / "plots").glob("*.png")) == ["tokens_per_trainer.png", "train_loss.png"]

    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_stored_results_fill_in_and_say_how_bpb_was_measured(tmp_path: Path) -> None:
    write_log(tmp_path, [e for e in three_rounds() if not isinstance(e, ev.EvalCompleted)])  # log missed them
    results = [
        {"round": 2, "status": "ok", "bpb": 3.0, "tokens": 65536, "sampled": True, "sample": "stored",
         "prompt": "The ", "checkpoint_tokens": 10000},
        {"round": 3, "status": "failed", "reason": "sha256 mismatch"},
    ]
    text = write_report(tmp_path, eval_results=results).read_text()
    assert "| 2 | 5,000 | 10,000 | 2 | 2.9000 | 3.0000 | 21.5 |" in text
    assert "| 3 | 6,000 | 15,000 | 2 | 2.6000 | failed | 21.5 |" in text
    assert "a seeded sample of 65,536 validation tokens" in text
    assert "prompt: `'The '`" in text and "The stored" in text


def test_summary_tolerates_duplicates_and_text_integers() -> None:
    events = three_rounds()
    records = [record(e, i) for i, e in enumerate(events)] + [record(events[-3], 99)]  # a redelivered event
    summary = summarize(records)
    assert [r.round for r in summary.ordered_rounds] == [0, 1, 2, 3]
    row = summary.rounds[2]
    assert row.tokens == 5000 and row.total_tokens == 10000 and row.tokens_by_trainer == {"a": 3000, "b": 2000}
    assert row.train_s == 18.0 and row.overhead_s == pytest.approx(3.5)
    assert summary.rounds[1].eval is not None and summary.rounds[1].eval.bpb == 3.25
    assert summary.trainers == ["a", "b"]


def test_cli_writes_the_report(tmp_path: Path) -> None:
    write_log(tmp_path, three_rounds())
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "report.md")
    missing = CliRunner().invoke(cli, ["report", str(tmp_path / "gone")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
