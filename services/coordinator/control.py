"""What the outside world may ask of a running coordinator, and the gRPC API that asks it.

:class:`RunControl` is the thread-safe meeting point between the round loop and
the Coordinator gRPC service: stop requests go in (``request_stop_round``,
``request_stop_run``), the loop's status comes out (``snapshot``). The servicer
answers ``GetStatus``, ``StopRound``, ``StopRun`` and ``WatchEvents`` (a replay
of the run's streams, then new entries as they come).

The coordinator writes its API address to ``<run_dir>/coordinator.json`` so
``pilot status`` / ``pilot round stop`` / ``pilot stop`` find it by run dir.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pilot.bus import Bus
from pilot.bus.registry import wrap
from pilot.keys import Stream
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc

ADDRESS_FILE = "coordinator.json"


@dataclass
class StatusView:
    state: int = svc.RUN_STATE_WAITING
    round: int = 0
    participants: list[str] = field(default_factory=list)
    tokens_total: int = 0
    last_checkpoint_uri: str = ""
    last_bpb: float = 0.0
    round_started_at: float | None = None  # coordinator's monotonic clock


class RunControl:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._lock = threading.Lock()
        self._status = StatusView()
        self._stop_round: dict[int, str] = {}  # round (0 = the open one) -> detail
        self._stop_run: str | None = None

    # --- requests from outside ---------------------------------------------------
    def request_stop_round(self, round: int, detail: str) -> tuple[bool, int, str]:
        with self._lock:
            open_round = self._status.round if self._status.state == svc.RUN_STATE_TRAINING else 0
            target = round or open_round
            if not target or target != open_round:
                return False, target, f"round {target or '(none)'} is not open (open round: {open_round or 'none'})"
            self._stop_round[target] = detail or "requested"
            return True, target, ""

    def request_stop_run(self, detail: str) -> None:
        with self._lock:
            self._stop_run = detail or "requested"

    # --- what the round loop reads and writes --------------------------------------
    def take_stop_round(self, round: int) -> str | None:
        with self._lock:
            return self._stop_round.pop(round, None)

    @property
    def stop_run_requested(self) -> str | None:
        with self._lock:
            return self._stop_run

    def update(self, **changes: object) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self._status, key, value)

    def snapshot(self) -> StatusView:
        with self._lock:
            return StatusView(**{**self._status.__dict__, "participants": list(self._status.participants)})


class CoordinatorService(svc_grpc.CoordinatorServicer):
    def __init__(self, control: RunControl, bus: Bus, alive: "callable[[], list[str]]") -> None:  # type: ignore[valid-type]
        self.control, self.bus, self.alive = control, bus, alive

    def _check_run(self, run_id: str, context: grpc.ServicerContext) -> None:
        if run_id and run_id != self.control.run_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this coordinator runs {self.control.run_id!r}, not {run_id!r}")

    def GetStatus(self, request: svc.GetStatusRequest, context: grpc.ServicerContext) -> svc.RunStatus:
        self._check_run(request.run_id, context)
        view = self.control.snapshot()
        elapsed = time.monotonic() - view.round_started_at if view.round_started_at else 0.0
        return svc.RunStatus(
            schema_version=1, run_id=self.control.run_id, state=view.state, round=view.round,
            participants=view.participants, trainers_alive=self.alive(), tokens_total=view.tokens_total,
            last_checkpoint_uri=view.last_checkpoint_uri, last_bpb=view.last_bpb, round_elapsed_s=elapsed,
        )

    def StopRound(self, request: svc.StopRoundRequest, context: grpc.ServicerContext) -> svc.StopRoundResponse:
        self._check_run(request.run_id, context)
        accepted, round, message = self.control.request_stop_round(request.round, request.detail)
        return svc.StopRoundResponse(accepted=accepted, round=round, message=message)

    def StopRun(self, request: svc.StopRunRequest, context: grpc.ServicerContext) -> svc.StopRunResponse:
        self._check_run(request.run_id, context)
        self.control.request_stop_run(request.detail)
        return svc.StopRunResponse(accepted=True, message="the run stops after the current round closes")

    def WatchEvents(self, request: svc.WatchEventsRequest, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        self._check_run(request.run_id, context)
        streams = [Stream.CONTROL, Stream.TELEMETRY] if request.include_telemetry else [Stream.CONTROL]
        start = request.from_id or "0-0"
        cursors = {s: (self.bus.last_id(s) if start == "$" else ("0-0" if start == "0" else start)) for s in streams}
        while context.is_active():
            for entry in self.bus.read_streams(cursors, block_ms=1000):
                cursors[entry.stream] = entry.entry_id
                if entry.event is not None:
                    yield wrap(entry.event, entry.entry_id, entry.stream)


def write_address(run_dir: Path, address: str) -> None:
    (run_dir / ADDRESS_FILE).write_text(json.dumps({"address": address}))


def read_address(run_dir: Path) -> str | None:
    try:
        return str(json.loads((run_dir / ADDRESS_FILE).read_text())["address"])
    except (OSError, ValueError, KeyError):
        return None
