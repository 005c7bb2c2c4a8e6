"""The trainer host: one long-lived trainer process per work dir, so a round pays no start-up.

Flower 1.41 starts a fresh ClientApp process for every message. Importing torch and
Pilot's trainer modules and building the first ``torch.optim`` optimiser (which imports
``torch._dynamo``) cost ~20 s of CPU per round on a 2-core box. So the thin ClientApp
(``client_app.py``) hands each round to this process, which keeps all of that loaded:

- It serves ``pilot.v1.TrainerHost`` (``Describe``, ``RunRound``, ``Shutdown``) and
  ``grpc.health.v1`` on a Unix socket in the work dir (``host_client.socket_path``).
  ``RunRound`` carries the round order, the trainer's identity and the path of a
  safetensors file with W_r in ``<work_dir>/exchange/`` (deleted once loaded); the
  reply carries the trainer report and the path of the encoded update's safetensors
  file (the client deletes it) with the update's metadata.
- Rounds are trained in one place, :meth:`TrainerHost.train_round`, always on the same
  long-lived thread: ``services.trainer.ddp.train_round``, i.e. ``run_local_round`` in
  this process for one device, and for ``num-devices`` > 1 the process-wide DDP
  ``RankGroup`` (this process is rank 0), which thus lives as long as the host.
- With ``compile=true`` the model is ``torch.compile``'d; the host keeps dynamo's
  compiled graphs for later rounds and inductor's cache in ``<work_dir>/compile-cache``.
- One host per work dir: it holds ``host.lock`` for its life (a successor waits for
  it), writes ``host.json`` (pid, create time, run, socket, watched pid) once serving,
  and removes both that and the socket when it exits.
- It is bound to one run id, work dir and code root (``Describe``); a client for
  anything else shuts it down and starts its own.

It exits:
- when idle (no round) for ``--idle-exit-s``;
- when the watched process (the SuperNode side that started it) is gone, on
  SIGTERM/SIGINT, or on ``Shutdown``;
- at once (``os._exit``) if any of these happens mid-round, or if the client of the
  round in progress goes away (killed, or past the message's TTL): the round's
  leases then expire like a killed trainer's, so no data is recorded as trained
  whose update never reached the coordinator.

Run by the ClientApp as ``python -m services.trainer.host --work-dir DIR --run-id RUN
--socket PATH --watch-pid PID [--idle-exit-s S]`` (see ``host_client.ensure_host``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil

from pilot.grpc_util import start_grpc_server
from pilot.log import bind_run, configure, get_logger
from pilot.protocol import RoundOrder
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc
from services.trainer.host_client import (
    CODE_ROOT,
    LIFE_LOCK,
    PID_FILE,
    SCHEMA_VERSION,
    exchange_dir,
    file_lock,
    identity_from_spec,
    order_from_request,
    read_arrays,
    read_pid_file,
    write_arrays,
)
from services.trainer.identity import TrainerIdentity

if TYPE_CHECKING:  # torch is imported by the warm-up thread, not before the host serves
    import torch

    from services.trainer.local_round import LocalResult

log = get_logger(__name__)

COMPILE_CACHE_DIR = "compile-cache"  # the host's TORCHINDUCTOR_CACHE_DIR, in its work dir
EXIT_ABANDONED = 75  # a round in progress was abandoned (client gone, watched process gone, signal)
WATCH_EVERY_S = 0.5


class TrainerHost(svc_grpc.TrainerHostServicer):
    """The servicer and the host's lifetime (warm-up, watchdog, idle exit)."""

    def __init__(self, run_id: str, work_dir: Path, sock: Path, watched: psutil.Process, idle_exit_s: float) -> None:
        self.run_id = run_id
        self.work_dir = work_dir
        self.sock = sock
        self.watched = watched
        self.idle_exit_s = idle_exit_s
        self.warm = threading.Event()
        self.warm_error: str | None = None
        self.stopping = threading.Event()
        self.stop_reason = ""
        self._round_lock = threading.Lock()
        self._round_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round")  # DDP wants one thread
        self._active_call: object | None = None  # the RunRound in progress
        self.busy_round = 0
        self.rounds_served = 0
        self.last_active = time.monotonic()

    # --- the one place a round is trained ----------------------------------------------
    def train_round(self, order: RoundOrder, global_state: dict[str, torch.Tensor], who: TrainerIdentity,
                    received_at: float) -> LocalResult:
        from services.trainer.ddp import train_round

        return train_round(order, global_state, who, received_at=received_at)

    # --- lifetime ----------------------------------------------------------------------
    def warm_up(self) -> None:
        """Import torch and the trainer modules, and build one optimiser (torch.optim imports torch._dynamo)."""
        started = time.monotonic()
        try:
            import torch

            import services.trainer.ddp  # noqa: F401 (and local_round, the model, the optimisers...)

            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        except BaseException as exc:  # reported to every RunRound
            self.warm_error = f"{type(exc).__name__}: {exc}"
            log.exception("trainer host warm-up failed")
        finally:
            self.warm.set()
        log.info("trainer host warm", seconds=round(time.monotonic() - started, 2))

    def watch(self) -> None:
        """End the host when the watched process is gone or it has been idle too long."""
        while not self.stopping.wait(WATCH_EVERY_S):
            if not _alive(self.watched):
                self.end(f"the process it watches (pid {self.watched.pid}) is gone")
            elif not self.busy_round and time.monotonic() - self.last_active > self.idle_exit_s:
                self.end(f"idle for {self.idle_exit_s:g} s")

    def end(self, reason: str) -> None:
        """Stop serving; mid-round, abandon the round and exit at once."""
        if self.busy_round:
            self.abandon(f"{reason} during round {self.busy_round}")
        self.stop_reason = self.stop_reason or reason
        self.stopping.set()

    def abandon(self, reason: str) -> None:
        log.error("trainer host abandons its round and exits", reason=reason)
        self.cleanup()
        os._exit(EXIT_ABANDONED)

    def cleanup(self) -> None:
        """Remove the socket and the pid file (if it is still this process's)."""
        record = read_pid_file(self.work_dir)
        if record and record.get("pid") == os.getpid():
            (self.work_dir / PID_FILE).unlink(missing_ok=True)
        self.sock.unlink(missing_ok=True)

    def info(self) -> svc.HostInfo:
        return svc.HostInfo(
            schema_version=SCHEMA_VERSION, pid=os.getpid(), run_id=self.run_id, work_dir=str(self.work_dir),
            code_root=str(CODE_ROOT), watch_pid=self.watched.pid, rounds_served=self.rounds_served,
            busy_round=self.busy_round, warm=self.warm.is_set() and self.warm_error is None,
        )

    # --- RPCs --------------------------------------------------------------------------
    def Describe(self, request: svc.DescribeHostRequest, context: grpc.ServicerContext) -> svc.HostInfo:
        return self.info()

    def Shutdown(self, request: svc.ShutdownHostRequest, context: grpc.ServicerContext) -> svc.ShutdownHostReply:
        log.info("trainer host asked to shut down", reason=request.reason)
        threading.Timer(0.2, self.end, (f"asked to: {request.reason or 'no reason given'}",)).start()
        return svc.ShutdownHostReply(pid=os.getpid())

    def RunRound(self, request: svc.RunRoundRequest, context: grpc.ServicerContext) -> svc.RunRoundReply:
        received = time.monotonic()
        refusal = self._refusal(request)
        if refusal:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        if not self._round_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.ABORTED, f"the trainer host is busy with round {self.busy_round}")
        call = object()
        self._active_call, self.busy_round = call, request.round
        error = ""
        try:
            if not context.add_callback(lambda: self._on_call_end(call)):
                raise RuntimeError("the ClientApp went away before the round started")
            return self._round_thread.submit(self._run_round, request, received).result()
        except Exception as exc:  # the round failed: the client turns this into an error reply
            log.exception("round failed", round=request.round)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._active_call, self.busy_round = None, 0
            self.last_active = time.monotonic()
            self._round_lock.release()
        context.abort(grpc.StatusCode.INTERNAL, error)

    def _refusal(self, request: svc.RunRoundRequest) -> str | None:
        if request.schema_version != SCHEMA_VERSION:
            return f"request schema_version {request.schema_version} is not {SCHEMA_VERSION}"
        if request.run_id != self.run_id:
            return f"this trainer host serves run {self.run_id!r}, not {request.run_id!r}"
        if Path(request.trainer.work_dir).resolve() != self.work_dir:
            return f"this trainer host serves work dir {self.work_dir}, not {request.trainer.work_dir}"
        if Path(request.weights_path).resolve().parent != exchange_dir(self.work_dir).resolve():
            return f"weights_path {request.weights_path} is not in {exchange_dir(self.work_dir)}"
        return None

    def _on_call_end(self, call: object) -> None:
        if self._active_call is call:  # the RPC ended while its round still runs: the client is gone
            self.abandon("the ClientApp went away (killed, or past its message's TTL)")

    def _run_round(self, request: svc.RunRoundRequest, received: float) -> svc.RunRoundReply:
        self.warm.wait()
        if self.warm_error:
            raise RuntimeError(f"the trainer host failed to start: {self.warm_error}")
        bind_run(run_id=self.run_id, round=request.round, trainer_id=request.trainer.trainer_id)
        weights_path = Path(request.weights_path)
        global_state = read_arrays(weights_path, framework="pt")
        weights_path.unlink(missing_ok=True)
        result = self.train_round(order_from_request(request), global_state, identity_from_spec(request.trainer),
                                  received_at=received - request.elapsed_s)
        update_path = exchange_dir(self.work_dir) / f"update-r{request.round:05d}-{os.getpid()}.safetensors"
        write_arrays(update_path, result.encoded.to_arrays())
        self.rounds_served += 1
        report = result.report
        return svc.RunRoundReply(
            schema_version=SCHEMA_VERSION, tokens=report.tokens, steps=report.steps, mean_loss=report.mean_loss,
            train_seconds=report.train_seconds, setup_seconds=report.setup_seconds,
            units_completed=report.units_completed, stopped_by=report.stopped_by, update_path=str(update_path),
            update_metadata_json=json.dumps(result.encoded.metadata()), host_pid=os.getpid(),
            rounds_served=self.rounds_served,
        )


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # is_running checks pid reuse
    except psutil.Error:
        return False


def _write_pid_file(host: TrainerHost) -> None:
    me = psutil.Process()
    record = {"pid": me.pid, "create_time": me.create_time(), "run_id": host.run_id, "work_dir": str(host.work_dir),
              "socket": str(host.sock), "watch_pid": host.watched.pid}
    tmp = host.work_dir / f".{PID_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, host.work_dir / PID_FILE)


def _clear_exchange(work_dir: Path) -> None:
    """Remove what a crashed predecessor or client left in ``exchange/``."""
    folder = exchange_dir(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file():
            path.unlink(missing_ok=True)


def serve(run_id: str, work_dir: Path, sock: Path, watch_pid: int, idle_exit_s: float) -> int:
    """Serve until idle, orphaned, signalled or shut down; the exit code."""
    work_dir = work_dir.resolve()
    try:
        watched = psutil.Process(watch_pid)
    except psutil.Error:
        log.error("the process to watch is already gone", watch_pid=watch_pid)
        return 2
    work_dir.mkdir(parents=True, exist_ok=True)
    # compile=true: inductor's compiled kernels live in the work dir, so a restarted host reuses them (always:
    # torch itself exports its /tmp default into the environment, so an inherited value says nothing)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work_dir / COMPILE_CACHE_DIR)
    with file_lock(work_dir / LIFE_LOCK, timeout_s=60.0):  # a predecessor may still be exiting
        sock.unlink(missing_ok=True)
        _clear_exchange(work_dir)
        host = TrainerHost(run_id, work_dir, sock, watched, idle_exit_s)
        server = start_grpc_server([(svc_grpc.add_TrainerHostServicer_to_server, host)], f"unix:{sock}",
                                   max_workers=4)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: host.end(f"signal {signal.Signals(signum).name}"))
        _write_pid_file(host)
        threading.Thread(target=host.warm_up, name="warm-up", daemon=True).start()
        threading.Thread(target=host.watch, name="watch", daemon=True).start()
        log.info("trainer host serving", pid=os.getpid(), socket=str(sock), watch_pid=watch_pid,
                 idle_exit_s=idle_exit_s)
        while not host.stopping.wait(WATCH_EVERY_S):
            pass
        log.info("trainer host stopping", reason=host.stop_reason, rounds_served=host.rounds_served)
        server.stop(grace_s=2.0)
        host.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="the trainer's work dir")
    parser.add_argument("--run-id", required=True, help="the run this host trains for")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to serve on")
    parser.add_argument("--watch-pid", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--idle-exit-s", type=float, default=900.0, help="exit after this long without a round")
    args = parser.parse_args(argv)
    configure(service="trainer-host")
    bind_run(run_id=args.run_id)
    return serve(args.run_id, args.work_dir, args.socket, args.watch_pid, args.idle_exit_s)


if __name__ == "__main__":
    raise SystemExit(main())
