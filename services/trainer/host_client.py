"""The ClientApp's side of the trainer host: find, start, call and stop a node's host (imports no torch).

What this module does:
- :class:`HostSettings`: the node-config keys ``trainer-host`` (``auto`` | ``on`` | ``off``;
  ``$PILOT_TRAINER_HOST`` where the node-config has none), ``trainer-host-idle-s`` and
  ``trainer-host-start-s``; ``auto`` uses a host only where
  Flower starts a fresh ClientApp process per message (``flwr-clientapp``, i.e. a
  deployment) and trains in-process where the ClientApp process lives on (the
  simulation engine's Ray workers, in-process test grids).
- :func:`socket_path`: ``<work_dir>/host.sock``, or ``/tmp/pilot-host-<hash>.sock`` when
  that path would not fit a Unix socket address (107 bytes).
- :func:`write_arrays` / :func:`read_arrays`: numpy arrays <-> a safetensors file in the
  work dir's ``exchange/`` (written under a temporary name, then renamed), key order kept.
- :func:`ensure_host`: reuse the work dir's host when it serves the same run, work dir
  and code and is idle; otherwise shut it down and start a fresh one (detached: own
  session, output in ``host.log``), then wait for its gRPC health. Starting is
  serialised per work dir by a file lock.
- :class:`HostHandle`: ``run_round(request, timeout_s)``; a host that dies, hangs past
  the message's TTL or fails the round raises :class:`TrainerHostError` naming why and
  where its log is, which Flower turns into an error reply.
- :func:`stop_host`: SIGTERM (then SIGKILL) the host recorded in ``<work_dir>/host.json``.
- Conversions between :class:`~services.trainer.identity.TrainerIdentity` /
  :class:`~pilot.protocol.RoundOrder` and the ``pilot.v1.TrainerHost`` messages, used by
  both sides so the mapping lives in one place.

Files in a trainer's work dir: ``host.sock`` (or its /tmp fallback), ``host.json`` (pid,
run, socket, watched pid; written by the host once it serves), ``host.log``,
``host.lock`` (held by the host for its life: one host per work dir),
``host-start.lock`` (held by a client while it starts one), ``exchange/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from safetensors import safe_open
from safetensors.numpy import save_file

from pilot.errors import ConfigError, PilotError, RetryableError
from pilot.flower.procs import Child, terminate
from pilot.grpc_util import check_health, make_channel
from pilot.log import get_logger
from pilot.protocol import RoundOrder
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc
from services.trainer.identity import TrainerIdentity

log = get_logger(__name__)

SCHEMA_VERSION = 1
SERVICE = "pilot.v1.TrainerHost"
SOCKET_FILE, PID_FILE, LOG_FILE = "host.sock", "host.json", "host.log"
LIFE_LOCK, START_LOCK, EXCHANGE_DIR = "host.lock", "host-start.lock", "exchange"
MAX_SOCKET_PATH = 107  # bytes of sun_path, without the terminating NUL
CODE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding pilot/ and services/
HOST_MODES = ("auto", "on", "off")
HOST_MODE_ENV = "PILOT_TRAINER_HOST"  # the mode where the node-config does not say (e.g. a whole pilot run)
ORDER_KEY = "pilot.order"  # safetensors metadata: the arrays' key order (JSON list)


class TrainerHostError(PilotError):
    """The trainer host could not be started, went away mid-round, or failed the round."""


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class HostSettings:
    mode: str = "auto"  # auto | on | off (see the module docstring)
    idle_exit_s: float = 900.0  # the host exits after this long without a round
    start_timeout_s: float = 180.0  # how long a client waits for a new host to serve

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> HostSettings:
        source, mode = "node-config trainer-host", node_config.get("trainer-host")
        if mode is None:
            source, mode = f"${HOST_MODE_ENV}", os.environ.get(HOST_MODE_ENV) or "auto"
        mode = str(mode).strip().lower()
        if mode not in HOST_MODES:
            raise ConfigError(f"{source}={mode!r} is not one of {', '.join(HOST_MODES)}")
        values = {}
        for key, field_name in (("trainer-host-idle-s", "idle_exit_s"), ("trainer-host-start-s", "start_timeout_s")):
            if key in node_config:
                try:
                    values[field_name] = float(node_config[key])
                except (TypeError, ValueError):
                    raise ConfigError(f"node-config {key}={node_config[key]!r} is not a number") from None
                if values[field_name] <= 0:
                    raise ConfigError(f"node-config {key} must be > 0, not {node_config[key]!r}")
        return cls(mode=mode, **values)

    def use_host(self) -> bool:
        """Hand rounds to a host? ``auto``: only where this process lives for one message."""
        if self.mode == "auto":
            return per_message_process()
        return self.mode == "on"


def per_message_process() -> bool:
    """True in Flower's ``flwr-clientapp`` process, which lives for one message."""
    return Path(sys.argv[0]).name == "flwr-clientapp" if sys.argv else False


def watch_pid() -> int:
    """The process whose end should end the host: the SuperNode side of this ClientApp.

    ``flwr-clientapp`` is started (per message) by the node's SuperExec, which exits with
    its SuperNode: watch that parent. Elsewhere the ClientApp lives in a long-lived
    process (a Ray worker, a test): watch this process.
    """
    return os.getppid() if per_message_process() else os.getpid()


# ----------------------------------------------------------------------------- paths, files


def socket_path(work_dir: Path) -> Path:
    path = Path(work_dir).resolve() / SOCKET_FILE
    if len(str(path).encode()) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(Path(work_dir).resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"pilot-host-{digest}.sock"


def exchange_dir(work_dir: Path) -> Path:
    return Path(work_dir) / EXCHANGE_DIR


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to a safetensors file at ``path`` (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    try:
        save_file(contiguous, str(tmp), metadata={ORDER_KEY: json.dumps(list(contiguous))})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_arrays(path: Path, framework: str = "numpy") -> dict[str, Any]:
    """The arrays of a file :func:`write_arrays` wrote, in their written order (``framework="pt"``: tensors)."""
    try:
        with safe_open(str(path), framework=framework) as handle:
            order = json.loads((handle.metadata() or {}).get(ORDER_KEY, "null")) or sorted(handle.keys())
            return {key: handle.get_tensor(key) for key in order}
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerHostError(f"cannot read arrays from {path}: {exc}") from exc


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float | None = None) -> Iterator[int]:
    """An exclusive ``flock`` on ``path`` (created); ``TrainerHostError`` after ``timeout_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TrainerHostError(f"{path} stayed locked for {timeout_s:g} s") from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def read_pid_file(work_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(work_dir) / PID_FILE).read_text())
    except (OSError, ValueError):
        return None


def log_tail(work_dir: Path, limit: int = 600) -> str:
    try:
        return (Path(work_dir) / LOG_FILE).read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------- message mapping


def spec_from_identity(who: TrainerIdentity) -> svc.TrainerSpec:
    spec = svc.TrainerSpec(trainer_id=who.trainer_id, node_id=who.node_id, work_dir=str(who.work_dir),
                           data_path=str(who.data_path or ""), device=who.device or "", num_devices=who.num_devices)
    if who.partition_id is not None:
        spec.partition_id = who.partition_id
    if who.num_partitions is not None:
        spec.num_partitions = who.num_partitions
    return spec


def identity_from_spec(spec: svc.TrainerSpec) -> TrainerIdentity:
    return TrainerIdentity(
        trainer_id=spec.trainer_id, node_id=int(spec.node_id), work_dir=Path(spec.work_dir),
        data_path=Path(spec.data_path) if spec.data_path else None, device=spec.device or None,
        partition_id=spec.partition_id if spec.HasField("partition_id") else None,
        num_partitions=spec.num_partitions if spec.HasField("num_partitions") else None,
        num_devices=spec.num_devices or 1,
    )


def round_request(order: RoundOrder, who: TrainerIdentity, weights_path: Path, elapsed_s: float) -> svc.RunRoundRequest:
    return svc.RunRoundRequest(
        schema_version=SCHEMA_VERSION, run_id=str(order.run_config.get("run-id", "pilot")), round=order.round,
        seconds=order.seconds, steps=order.steps, since_id=order.since_id, tokenizer_sha256=order.tokenizer_sha256,
        run_config_json=json.dumps(order.run_config, sort_keys=True), trainer=spec_from_identity(who),
        weights_path=str(weights_path), elapsed_s=elapsed_s,
    )


def order_from_request(request: svc.RunRoundRequest) -> RoundOrder:
    return RoundOrder(round=request.round, seconds=request.seconds, steps=request.steps, since_id=request.since_id,
                      tokenizer_sha256=request.tokenizer_sha256, run_config=json.loads(request.run_config_json))


# --------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class HostSpec:
    """The host a ClientApp needs: for this run and work dir, watching this SuperNode side."""

    run_id: str
    work_dir: Path
    settings: HostSettings
    watch_pid: int

    def matches(self, info: svc.HostInfo) -> str | None:
        """None when ``info`` describes a host this spec may reuse; else why not."""
        if info.run_id != self.run_id:
            return f"it serves run {info.run_id!r}, not {self.run_id!r}"
        if Path(info.work_dir) != Path(self.work_dir).resolve():
            return f"its work dir is {info.work_dir}"
        if info.code_root != str(CODE_ROOT):
            return f"it runs the code in {info.code_root}, not {CODE_ROOT}"
        if not psutil.pid_exists(info.watch_pid):
            return f"the process it watches ({info.watch_pid}) is gone"
        if info.busy_round:
            return f"it is still busy with round {info.busy_round}, which the coordinator has given up on"
        return None


class HostHandle:
    """A connected, serving trainer host."""

    def __init__(self, channel: grpc.Channel, info: svc.HostInfo, work_dir: Path, started: bool) -> None:
        self.channel = channel
        self.info = info
        self.work_dir = Path(work_dir)
        self.started = started  # this client started it
        self.stub = svc_grpc.TrainerHostStub(channel)

    @property
    def pid(self) -> int:
        return int(self.info.pid)

    def run_round(self, request: svc.RunRoundRequest, timeout_s: float | None = None) -> svc.RunRoundReply:
        try:
            return self.stub.RunRound(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            code, details = (exc.code(), exc.details()) if isinstance(exc, grpc.Call) else (None, str(exc))
            where = f"trainer host pid {self.pid} ({self.work_dir / LOG_FILE})"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                tail = log_tail(self.work_dir, 300)
                raise TrainerHostError(f"{where} went away during round {request.round}: {details}"
                                       + (f"; log ends: {tail}" if tail else "")) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TrainerHostError(f"{where} did not finish round {request.round} within {timeout_s:g} s "
                                       "(the message's TTL); the host ends itself") from None
            raise TrainerHostError(f"{where} failed round {request.round}: {details}") from None

    def close(self) -> None:
        self.channel.close()


def _describe(channel: grpc.Channel, timeout_s: float = 3.0) -> svc.HostInfo | None:
    """The host's HostInfo, or None when nothing serves the socket."""
    try:
        return svc_grpc.TrainerHostStub(channel).Describe(svc.DescribeHostRequest(), timeout=timeout_s)
    except grpc.RpcError:
        return None


def _shutdown(channel: grpc.Channel, work_dir: Path, reason: str, grace_s: float = 10.0) -> None:
    """Ask the host to exit; SIGKILL it if it still runs after ``grace_s``."""
    pid = None
    with contextlib.suppress(grpc.RpcError):
        pid = svc_grpc.TrainerHostStub(channel).Shutdown(svc.ShutdownHostRequest(reason=reason), timeout=5.0).pid
    if pid:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(grace_s)
    stop_host(work_dir, grace_s=1.0)


def _spawn(spec: HostSpec, sock: Path) -> Child:
    argv = [sys.executable, "-m", "services.trainer.host", "--work-dir", str(Path(spec.work_dir).resolve()),
            "--run-id", spec.run_id, "--socket", str(sock), "--watch-pid", str(spec.watch_pid),
            "--idle-exit-s", f"{spec.settings.idle_exit_s:g}"]
    pythonpath = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return Child("trainer-host", argv, Path(spec.work_dir) / LOG_FILE, env, cwd=Path(spec.work_dir),
                 die_with_parent=False).start()


def _wait_serving(channel: grpc.Channel, child: Child, spec: HostSpec) -> svc.HostInfo:
    deadline = time.monotonic() + spec.settings.start_timeout_s
    while time.monotonic() < deadline:
        if not child.running:
            code = child.proc.returncode if child.proc else "?"
            raise TrainerHostError(f"the trainer host exited with code {code} before serving; "
                                   f"{child.log_path} ends: {child.log_text(limit=600).strip()}")
        with contextlib.suppress(RetryableError):
            if check_health(channel, SERVICE, timeout_s=1.0) == "SERVING":
                info = _describe(channel)
                if info is not None and info.pid == child.pid:
                    return info
        time.sleep(0.1)
    child.stop(grace_s=2.0)
    raise TrainerHostError(f"the trainer host (pid {child.pid}) did not serve within "
                           f"{spec.settings.start_timeout_s:g} s (node-config trainer-host-start-s); "
                           f"see {child.log_path}")


def ensure_host(spec: HostSpec) -> HostHandle:
    """A serving host for ``spec``: the work dir's own when it may be reused, else a fresh one."""
    work_dir = Path(spec.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    sock = socket_path(work_dir)
    target = f"unix:{sock}"
    with file_lock(work_dir / START_LOCK, timeout_s=spec.settings.start_timeout_s):
        channel = make_channel(target)
        info = _describe(channel) if sock.exists() else None
        if info is not None:
            why_not = spec.matches(info)
            if why_not is None:
                return HostHandle(channel, info, work_dir, started=False)
            log.warning("replacing the trainer host", pid=info.pid, reason=why_not)
            _shutdown(channel, work_dir, f"replaced: {why_not}")
        channel.close()
        child = _spawn(spec, sock)
        channel = make_channel(target)
        try:
            info = _wait_serving(channel, child, spec)
        except BaseException:
            channel.close()
            raise
        log.info("trainer host started", pid=info.pid, work_dir=str(work_dir), socket=str(sock))
        return HostHandle(channel, info, work_dir, started=True)


def stop_host(work_dir: Path, grace_s: float = 5.0) -> int | None:
    """Stop the host recorded in ``work_dir/host.json`` (SIGTERM, SIGKILL after ``grace_s``); its pid or None."""
    record = read_pid_file(work_dir)
    if not record:
        return None
    pid = int(record.get("pid", 0))
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - float(record.get("create_time", 0))) > 1.0:
            return None  # the pid was reused by another process
    except (psutil.Error, ValueError):
        return None
    terminate([proc], grace_s)
    return pid

