"""`pilot events` commands: read a run's event streams.

``pilot events runs`` lists the runs Redis knows. ``pilot events tail --run RUN``
prints the run's events decoded, one per line (``--json`` for JSON lines), from
the start or after ``--from ID``; ``--follow`` keeps waiting for new ones.
Entries that do not decode are printed as such (with the reason) instead of
stopping the tail.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from pilot.cli.common import user_errors

if TYPE_CHECKING:
    from pilot.bus import BusEntry

STREAM_CHOICES = ("control", "telemetry", "deadletter", "all")
_ENVELOPE = ("schema_version", "run_id")


def _time(entry_id: str) -> str:
    ms = int(entry_id.split("-", 1)[0])
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entry_record(entry: BusEntry) -> dict[str, Any]:
    """A JSON-ready dict for one entry (event fields without the envelope)."""
    from google.protobuf.json_format import MessageToDict

    record: dict[str, Any] = {"id": entry.entry_id, "time": _time(entry.entry_id), "stream": entry.stream.value,
                              "type": entry.type or None}
    if entry.dead_letter is not None:
        record["dead_letter"] = vars(entry.dead_letter)
    elif entry.event is not None:
        data = MessageToDict(entry.event, preserving_proto_field_name=True)
        record["event"] = {k: v for k, v in data.items() if k not in _ENVELOPE}
    else:
        record["error"] = str(entry.error)
    return record


def entry_line(entry: BusEntry) -> str:
    """One human-readable line for one entry."""
    record = entry_record(entry)
    head = f"{record['id']:<16} {record['time']} {record['stream']:<10} {record['type'] or '?':<20}"
    if "dead_letter" in record:
        dl = record["dead_letter"]
        return f"{head} from {dl['source_stream']} {dl['source_id']} (group {dl['group'] or '-'}): {dl['reason']}"
    if "error" in record:
        return f"{head} <undecodable: {record['error']}>"
    body = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in record["event"].items())
    return f"{head} {body}"


def tail(run_id: str, redis_url: str | None, from_id: str, streams: list[str], as_json: bool, follow: bool) -> None:
    from pilot.bus import Bus, redis_client
    from pilot.keys import Stream, check_run_id

    check_run_id(run_id)  # before connecting: a typo is reported as such
    bus = Bus(redis_client(redis_url), run_id)
    cursors = {Stream(s): from_id for s in streams}
    block_ms = 2000 if follow else None
    while True:
        entries = bus.read_streams(cursors, block_ms=block_ms)
        for entry in sorted(entries, key=lambda e: tuple(int(p) for p in e.entry_id.split("-"))):
            cursors[entry.stream] = entry.entry_id
            typer.echo(json.dumps(entry_record(entry)) if as_json else entry_line(entry))
        sys.stdout.flush()
        if not entries and not follow:
            return


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main `pilot` app."""
    events = typer.Typer(help="Read a run's event streams (Redis).", no_args_is_help=True)
    app.add_typer(events, name="events")

    @events.command("runs")
    def runs_cmd(
        redis: str | None = typer.Option(None, "--redis", help="Redis URL (default $PILOT_REDIS_URL).",
                                         envvar="PILOT_REDIS_URL", show_envvar=False),
    ) -> None:
        """List the runs known to Redis (those that published RunStarted), oldest first."""
        from pilot.bus import list_runs, redis_client

        with user_errors():
            for run_id, created in list_runs(redis_client(redis)):
                typer.echo(f"{run_id}\t{datetime.fromtimestamp(created, tz=UTC).isoformat(timespec='seconds')}")

    @events.command("tail")
    def tail_cmd(
        run: str = typer.Option(..., "--run", help="Run id."),
        from_id: str = typer.Option(
            "0-0", "--from", help="Start after this entry id, in each stream (0-0 = from the start)."
        ),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
        follow: bool = typer.Option(False, "--follow", "-f", help="Keep waiting for new events."),
        stream: str = typer.Option("control", "--stream", help=f"One of {', '.join(STREAM_CHOICES)}."),
        redis: str | None = typer.Option(None, "--redis", help="Redis URL (default $PILOT_REDIS_URL).",
                                         envvar="PILOT_REDIS_URL", show_envvar=False),
    ) -> None:
        """Print a run's events, decoded, one per line."""
        if stream not in STREAM_CHOICES:
            typer.echo(f"error: --stream must be one of {', '.join(STREAM_CHOICES)}, not {stream!r}", err=True)
            raise typer.Exit(2)
        if not re.fullmatch(r"\d+(-\d+)?|\$", from_id):
            typer.echo(f"error: --from must be an entry id like 1700000000000-0 (or $), not {from_id!r}", err=True)
            raise typer.Exit(2)
        streams = ["control", "telemetry", "deadletter"] if stream == "all" else [stream]
        try:
            with user_errors():
                tail(run, redis, from_id, streams, as_json, follow)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None
