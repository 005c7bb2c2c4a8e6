"""DDP inside one trainer: one process per device, kept alive across rounds, training each round together.

A node with N GPUs runs one trainer whose rounds are trained by N ranks under
DistributedDataParallel (rank k on ``cuda:k``; gloo ranks on CPU for tests and laptops):

- :class:`RankGroup`: owned for its lifetime by the trainer's long-lived host
  process, which is rank 0. ``RankGroup(world_size, device_type)`` starts the
  process group (NCCL on CUDA, gloo on CPU) and spawns ranks 1..N-1 as worker
  processes that wait for round orders. ``run_round(order, global_state, who,
  received_at=...)`` sends the order to every worker over its pipe, trains rank
  0's share in the calling process (every rank runs
  :func:`~services.trainer.local_round.run_local_round`; W_r reaches the workers
  through DDP's start-up broadcast from rank 0) and returns rank 0's
  :class:`~services.trainer.local_round.LocalResult`, which covers the whole
  group. ``close()`` stops the workers. World size 1 needs no process group and
  calls ``run_local_round`` directly.
- :func:`train_round`: the one call a trainer makes per TRAIN message: a single
  process when ``who.num_devices`` is 1, else a process-wide RankGroup kept for
  the next round (rebuilt when the world size or device type changes, or after a
  rank failed).

Failures never leave a rank waiting forever: every collective has the group's
timeout; a worker whose round raises reports the error and exits, so rank 0's
next collective fails at once instead of at the timeout; when rank 0 fails, it
stops the workers and the next round starts a fresh group; a worker exits when
rank 0's process goes (its order pipe closes, and a watchdog thread sees its
parent change).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch

from pilot.config import parse_config
from pilot.errors import ConfigError, PilotError
from pilot.log import bind_run, configure, get_logger
from pilot.protocol import RoundOrder
from pilot.run_config import RunConfig
from pilot.runtime import DistInfo, pick_device
from services.trainer.identity import TrainerIdentity
from services.trainer.local_round import LocalResult, run_local_round

log = get_logger(__name__)

HOST = "127.0.0.1"  # the ranks of one trainer share one machine
DEFAULT_TIMEOUT_S = 900.0  # the longest any rank waits in a collective (set-up included) before giving up
START_TIMEOUT_S = 300.0  # spawning and joining the workers (a cold torch import under load is slow)
STOP_GRACE_S = 10.0  # close(): how long a worker may take to leave before it is terminated
PARENT_POLL_S = 1.0  # how often a worker checks that rank 0's process is still there


class RankGroupError(PilotError):
    """A rank of the group failed or vanished; the group is closed and must be rebuilt."""


def backend_for(device_type: str) -> str:
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ConfigError(f"num-devices: DDP trains on cuda or cpu devices, not {device_type!r}")


def _rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _preload_torch() -> None:
    """Import now what torch loads lazily on the first optimiser (torch._dynamo: seconds of CPU), not mid-round."""
    import torch._dynamo  # noqa: F401


def _join_group(store: torch.distributed.Store, rank: int, world_size: int, device_type: str,
                timeout_s: float) -> None:
    device = _rank_device(device_type, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        backend=backend_for(device_type), store=store, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None,
    )


@dataclass
class _Worker:
    rank: int
    process: Any  # a spawn-context multiprocessing.Process
    conn: Connection


class RankGroup:
    """Ranks 0..N-1 of one trainer: rank 0 is this process, ranks 1..N-1 are spawned workers.

    Create it from a long-lived thread of the host process and keep it for the
    process's life; only one RankGroup with ``world_size > 1`` can exist per
    process (torch has one default process group).
    """

    def __init__(self, world_size: int, device_type: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 verify_replicas: bool = False) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"num-devices must be an integer >= 1, got {world_size!r}")
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ConfigError(f"num-devices={world_size} but this machine has {torch.cuda.device_count()} "
                              "CUDA devices")
        self.world_size, self.device_type, self.timeout_s = world_size, device_type, timeout_s
        self.backend = backend_for(device_type)
        self.verify_replicas = verify_replicas  # every rank hashes its weights after a round; rank 0 compares
        self.dist = DistInfo(rank=0, local_rank=0, world_size=world_size)
        self.workers: list[_Worker] = []
        self.closed = False
        if world_size > 1:
            self._start()

    # ------------------------------------------------------------------ life cycle

    def _start(self) -> None:
        if torch.distributed.is_initialized():
            raise ConfigError("this process already has a torch.distributed process group; one RankGroup per process")
        started = time.monotonic()
        store = torch.distributed.TCPStore(HOST, 0, self.world_size, True, timeout=timedelta(seconds=START_TIMEOUT_S),
                                           wait_for_workers=False)  # the workers are not spawned yet
        context = torch.multiprocessing.get_context("spawn")
        try:
            for rank in range(1, self.world_size):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=_worker_main, name=f"pilot-trainer-rank-{rank}", daemon=True,
                    args=(rank, self.world_size, self.device_type, store.port, self.timeout_s, self.verify_replicas,
                          os.getpid(), theirs),
                )
                process.start()
                theirs.close()
                self.workers.append(_Worker(rank, process, ours))
            _preload_torch()  # while the workers start
            for worker in self.workers:  # alive and about to join: a worker that died starting fails fast here
                self._expect(worker, "started", START_TIMEOUT_S)
            _join_group(store, 0, self.world_size, self.device_type, self.timeout_s)
            for worker in self.workers:
                self._expect(worker, "ready", START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        log.info("rank group ready", world_size=self.world_size, backend=self.backend,
                 seconds=round(time.monotonic() - started, 2))

    def close(self) -> None:
        """Stop the workers (asking first, then terminating) and leave the process group; idempotent."""
        if self.closed:
            return
        self.closed = True
        for worker in self.workers:
            try:
                worker.conn.send(("close",))
            except OSError:
                pass
        for worker in self.workers:
            worker.process.join(STOP_GRACE_S)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(STOP_GRACE_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        return [int(worker.process.pid) for worker in self.workers]

    # ------------------------------------------------------------------ rounds

    def run_round(self, order: RoundOrder, global_state: dict[str, torch.Tensor], who: TrainerIdentity, *,
                  received_at: float) -> LocalResult:
        """Train one round on every rank; rank 0's result (Δ, report and every rank's summary).

        Raises what rank 0 raised, or :class:`RankGroupError` when a worker
        failed; either way a group that failed mid-round is closed.
        """
        if self.closed:
            raise RankGroupError("this rank group is closed")
        if self.world_size == 1:
            result = run_local_round(order, global_state, who, received_at=received_at,
                                     verify_replicas=self.verify_replicas)
            assert result is not None  # a single process is rank 0
            return result
        try:
            for worker in self.workers:
                worker.conn.send(("round", order, who, received_at))
            result = run_local_round(order, global_state, who, received_at=received_at, dist=self.dist,
                                     verify_replicas=self.verify_replicas)
            for worker in self.workers:  # their last collective is done: they are returning now
                self._expect(worker, "done", self.timeout_s)
        except BaseException as exc:
            failures = self._failures()
            self.close()
            if failures:
                raise RankGroupError("; ".join(failures)) from exc
            raise
        assert result is not None
        return result

    def _expect(self, worker: _Worker, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not worker.conn.poll(min(PARENT_POLL_S, max(deadline - time.monotonic(), 0.0))):
            if not worker.process.is_alive():
                raise RankGroupError(f"rank {worker.rank} exited (code {worker.process.exitcode}) before {what!r}")
            if time.monotonic() >= deadline:
                raise RankGroupError(f"rank {worker.rank} sent no {what!r} within {timeout_s:.0f} s")
        kind, detail = worker.conn.recv()
        if kind != what:
            raise RankGroupError(f"rank {worker.rank} {kind}: {detail}")

    def _failures(self) -> list[str]:
        """What the workers reported after a failed round (each gets a moment to tell)."""
        found = []
        deadline = time.monotonic() + 2.0
        for worker in self.workers:
            try:
                if worker.conn.poll(max(deadline - time.monotonic(), 0.0)):
                    kind, detail = worker.conn.recv()
                    if kind == "failed":
                        found.append(f"rank {worker.rank} failed: {detail}")
            except (EOFError, OSError):
                found.append(f"rank {worker.rank} exited (code {worker.process.exitcode})")
        return found


def _watch_parent(parent_pid: int) -> None:
    """Exit this worker as soon as rank 0's process is gone (we get re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _worker_main(rank: int, world_size: int, device_type: str, store_port: int, timeout_s: float,
                 verify_replicas: bool, parent_pid: int, conn: Connection) -> None:
    """A worker rank's life: join the group, then train every round order until told to close."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    configure(service="trainer")
    if device_type == "cpu":  # the ranks share the machine's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    try:
        _preload_torch()
        conn.send(("started", None))
        store = torch.distributed.TCPStore(HOST, store_port, world_size, False,
                                           timeout=timedelta(seconds=START_TIMEOUT_S))
        _join_group(store, rank, world_size, device_type, timeout_s)
    except BaseException:
        conn.send(("failed", _last_line(traceback.format_exc())))
        return
    conn.send(("ready", None))
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(1)  # rank 0 is gone
        if message[0] == "close":
            break
        _, order, who, received_at = message
        bind_run(run_id=str(order.run_config.get("run-id", "pilot")), round=order.round,
                 trainer_id=who.trainer_id, rank=rank)
        try:
            run_local_round(order, None, who, received_at=received_at, dist=dist, verify_replicas=verify_replicas)
        except BaseException:
            log.error("rank failed", rank=rank, error=traceback.format_exc())
            conn.send(("failed", _last_line(traceback.format_exc())))
            os._exit(1)  # closes our sockets, so rank 0's next collective fails now, not at the timeout
        conn.send(("done", None))
    torch.distributed.destroy_process_group()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


# ------------------------------------------------------------------ the one call per round

_shared: RankGroup | None = None
_shared_lock = threading.Lock()


def train_round(order: RoundOrder, global_state: dict[str, torch.Tensor], who: TrainerIdentity, *,
                received_at: float) -> LocalResult:
    """Train this trainer's share of a round on ``who.num_devices`` devices; the whole trainer's result.

    One device: ``run_local_round`` in this process. More: the process-wide
    :class:`RankGroup` (started on first use, kept for later rounds, closed at
    exit). Call it from the same long-lived thread each time.
    """
    global _shared
    if who.num_devices <= 1:
        if who.num_devices < 1:
            raise ConfigError(f"num-devices must be >= 1, got {who.num_devices}")
        return RankGroup(1).run_round(order, global_state, who, received_at=received_at)
    cfg = parse_config(RunConfig, order.run_config, source="round order")
    device_type = pick_device(who.device or cfg.device).type
    with _shared_lock:
        if _shared is not None and (_shared.closed or _shared.world_size != who.num_devices
                                    or _shared.device_type != device_type):
            _shared.close()
            _shared = None
        if _shared is None:
            _shared = RankGroup(who.num_devices, device_type)
        group = _shared
    return group.run_round(order, global_state, who, received_at=received_at)


def close_shared_group() -> None:
    """Stop the process-wide group :func:`train_round` started, if any (also runs at exit)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


atexit.register(close_shared_group)
