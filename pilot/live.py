"""Live view of a run from its event streams: what ``pilot run`` shows while it trains.

:class:`RunMonitor` reads the run's control and telemetry streams (from the
start, so nothing is missed) and keeps what a person wants to see: the open
round and its time left, each trainer's tokens/s and loss, every round's
tokens and mean loss, and the validation BPB of each checkpoint as the
evaluator reports it. On a TTY it renders a rich table that refreshes in
place; elsewhere it logs one line per round event. ``summary_rows()`` feeds the
end-of-run table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from pilot.bus import Bus
from pilot.keys import Stream
from pilot.log import get_logger
from pilot.run_config import RunConfig
from pilot.v1 import events_pb2 as ev

log = get_logger(__name__)


@dataclass
class TrainerView:
    tokens_per_s: float = 0.0
    loss: float = float("nan")
    step: int = 0
    round: int = 0


@dataclass
class RoundView:
    round: int
    started_at: float  # this process's monotonic clock when the RoundStarted was read
    trainers: int = 0
    tokens: int = 0
    mean_loss: float = float("nan")
    wall_s: float = 0.0
    closed: bool = False
    rejected: list[str] = field(default_factory=list)


class RunMonitor:
    def __init__(self, bus: Bus, cfg: RunConfig, *, enabled: bool = True) -> None:
        self.bus, self.cfg = bus, cfg
        self.cursors = {Stream.CONTROL: "0-0", Stream.TELEMETRY: "0-0"}
        self.rounds: dict[int, RoundView] = {}
        self.trainers: dict[str, TrainerView] = {}
        self.evals: dict[int, float] = {}
        self.samples: dict[int, str] = {}
        self.stopped: str | None = None
        self.console = Console(stderr=True)
        self.fancy = enabled and sys.stderr.isatty()
        self._live: Live | None = None

    # --- reading ----------------------------------------------------------------------
    def poll(self) -> None:
        while True:
            entries = self.bus.read_streams(self.cursors, count=500)
            for entry in entries:
                self.cursors[entry.stream] = entry.entry_id
                if entry.event is not None:
                    self._apply(entry.event)
            if len(entries) < 500:
                break
        if self._live is not None:
            self._live.update(self.render())

    def _apply(self, event: Any) -> None:
        now = time.monotonic()
        if isinstance(event, ev.RoundStarted):
            self.rounds[event.round] = RoundView(round=event.round, started_at=now, trainers=len(event.participants))
            self._say(f"round {event.round} started with {len(event.participants)} trainers")
        elif isinstance(event, ev.RoundClosed):
            view = self.rounds.setdefault(event.round, RoundView(round=event.round, started_at=now))
            view.closed, view.tokens, view.mean_loss = True, event.tokens, event.mean_loss
            view.wall_s, view.trainers = event.wall_s, event.valid_updates
            self._say(f"round {event.round} closed: {event.valid_updates} updates, {event.tokens:,} tokens, "
                      f"loss {event.mean_loss:.4f}, {event.wall_s:.1f} s")
        elif isinstance(event, ev.UpdateRejected):
            self.rounds.setdefault(event.round, RoundView(event.round, now)).rejected.append(event.trainer_id)
            self._say(f"round {event.round}: update of {event.trainer_id} rejected: {event.reason}")
        elif isinstance(event, ev.EvalCompleted):
            if event.status == ev.EVAL_STATUS_OK:
                self.evals[event.round] = event.bpb
                self.samples[event.round] = event.sample
                self._say(f"round {event.round}: val BPB {event.bpb:.4f}")
            else:
                self._say(f"round {event.round}: evaluation failed: {event.failed_reason}")
        elif isinstance(event, ev.TrainerProgress):
            self.trainers[event.trainer_id] = TrainerView(event.tokens_per_s, event.loss, event.step, event.round)
        elif isinstance(event, ev.RunStopped):
            self.stopped = ev.StopReason.Name(event.reason)

    def _say(self, line: str) -> None:
        if self.fancy:
            self.console.log(line)
        else:
            log.info(line)

    # --- views ------------------------------------------------------------------------
    @property
    def last_closed_round(self) -> int:
        closed = [r for r, view in self.rounds.items() if view.closed]
        return max(closed, default=0)

    def render(self) -> Group:
        open_rounds = [v for v in self.rounds.values() if not v.closed]
        header = Table.grid()
        if open_rounds:
            view = open_rounds[-1]
            elapsed = time.monotonic() - view.started_at
            budget = (f"{self.cfg.round_steps} steps" if self.cfg.round_steps
                      else f"{max(self.cfg.round_seconds - elapsed, 0):.0f} s left")
            header.add_row(f"[bold]round {view.round}/{self.cfg.rounds}[/] — {elapsed:.0f} s in, {budget}")
        else:
            header.add_row(f"[bold]run {self.cfg.run_id}[/]: waiting for the next round")
        trainers = Table("trainer", "round", "step", "tokens/s", "loss", title="trainers")
        for name, view in sorted(self.trainers.items()):
            trainers.add_row(name, str(view.round), str(view.step), f"{view.tokens_per_s:,.0f}", f"{view.loss:.4f}")
        return Group(header, trainers, self.summary_table())

    def summary_rows(self) -> list[dict[str, Any]]:
        rows = [{"round": 0, "tokens": 0, "trainers": 0, "mean_loss": None, "val_bpb": self.evals.get(0),
                 "wall_s": None}]
        for number in sorted(self.rounds):
            view = self.rounds[number]
            rows.append({"round": number, "tokens": view.tokens, "trainers": view.trainers,
                         "mean_loss": view.mean_loss if view.closed else None, "val_bpb": self.evals.get(number),
                         "wall_s": view.wall_s if view.closed else None})
        return rows

    def summary_table(self) -> Table:
        table = Table("round", "trainers", "tokens", "train loss", "val BPB", "wall s", title="rounds")
        for row in self.summary_rows():
            table.add_row(
                str(row["round"]), str(row["trainers"]), f"{row['tokens']:,}",
                "-" if row["mean_loss"] is None else f"{row['mean_loss']:.4f}",
                "-" if row["val_bpb"] is None else f"{row['val_bpb']:.4f}",
                "-" if row["wall_s"] is None else f"{row['wall_s']:.1f}",
            )
        return table

    # --- context manager: the live display ------------------------------------------------
    def __enter__(self) -> RunMonitor:
        if self.fancy:
            self._live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
