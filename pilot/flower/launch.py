"""A real Flower 1.41 deployment on one box: SuperLink + N SuperNodes as children.

``LocalFederation(app_dir, num_nodes=2, log_dir=...)`` starts, on free loopback
ports, in insecure mode, each child in its own session with stdout+stderr in
``log_dir/<name>.log`` (with ``tls=...`` the ``--insecure`` flags become
``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` and ``--root-certificates``):

    flower-superlink --insecure --host 127.0.0.1 --port P_LINK
        --isolation subprocess --disable-runtime-dependency-installation
        [--database log_dir/superlink.db]
    flower-supernode --insecure --superlink 127.0.0.1:P_LINK
        --host 127.0.0.1 --port P_NODE_i --isolation subprocess
        --node-config "partition-id=i num-partitions=N ..."

In 1.41 the SuperLink serves the Fleet, Control and ServerAppIo ("Runtime")
APIs as HTTP on that one port (``--fleet-api-address`` and
``--control-api-address`` are deprecated no-ops; gRPC servers only start with
``FLWR_INTERNAL_GRPC_*_API=1``); each SuperNode serves its ClientApp-facing
Runtime API on its own ``--port`` (default 9094, so N nodes need N ports).
With ``--isolation subprocess`` (the default) every daemon starts a
``flower-superexec --runtime-api-address ... --parent-pid ...`` that polls
for tasks (every ``$FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` s, default 1; we set
0.25) and starts ``flwr-serverapp`` once per run (SuperLink side, output
discarded: read it with ``flwr log``) and ``flwr-clientapp`` once per message
(SuperNode side, output in the node's log). A SuperNode asks the SuperLink
for messages every 3 s when idle (hard-coded in 1.41).

Readiness: the SuperLink once ``GET /health`` answers 200; a SuperNode once
its log says ``SuperNode ID: <id>`` (it registered and activated) and its
port accepts connections.

Runs are submitted with the public CLI (``submit(cfg)``),

    flwr run APP_DIR pilot-local --run-config 'k=1 s="x"' --format json

or, 5-10 s faster on 2 cores, the same FAB build + Control API ``StartRun``
in-process (``submit(cfg, via="api")``), with ``FLWR_HOME=log_dir/flwr-home`` (each SuperNode gets its own
``log_dir/flwr-home-node-<i>``: FAB installs are not safe against concurrent
installers) whose ``config.toml`` holds the only connection (``[superlink.pilot-local] address = "127.0.0.1:P_LINK"``,
``insecure = true``), so nothing touches ``~/.flwr``. Status, stop and logs go
through the Control API in-process (:class:`~pilot.flower.runs.ControlClient`);
the CLI equivalents are ``flwr ls pilot-local --run-id ID --format json``,
``flwr stop ID pilot-local`` and ``flwr log ID pilot-local --show``.

With ``simulation=True`` the SuperLink gets ``--simulation`` and no SuperNodes
start: a run goes to ``flwr-simulation`` (Ray), sized per run with
``submit(..., federation_config={"num-supernodes": N, "client-resources-num-cpus": 1,
"client-resources-num-gpus": 0.5})`` (``flwr run --federation-config "k=v ..."``).
This is what ``flwr run .`` with the ``:local:`` connection does, minus its
drawbacks: that one starts a *detached* SuperLink on the fixed port 39091
(``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``) that outlives the command, with
runtime dependency installation on unless the env says otherwise.

Every child gets ``FLWR_HOME``, ``FLWR_DISABLE_UPDATE_CHECK=1``,
``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``,
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, ``PILOT_FLOWER_TAG=<uuid>`` (so a final
sweep finds strays, e.g. Ray workers that re-parent to init) and the
interpreter's ``bin/`` first on ``PATH`` (the daemons start
``flower-superexec``/``flwr-*app`` by name), plus the ``env`` given.

On exit -- normal, exception, or SIGINT/SIGTERM delivered to the parent while
inside the ``with`` block -- every child tree is stopped (SIGTERM, then SIGKILL
after ``grace_s``), nodes first; see :mod:`pilot.flower.procs`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import threading
import time
import uuid
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from pilot.flower.procs import LOOPBACK, TAG_ENV, Child, free_port, kill_tagged, port_open, tagged_processes
from pilot.flower.runconfig import (
    RunConfigValue,
    app_run_config_defaults,
    check_run_config,
    format_run_config,
)
from pilot.flower.runs import (
    CONNECTION,
    ControlClient,
    FlowerError,
    RunStatus,
    RunTimeout,
    bin_dir,
    flower_env,
    flwr_run,
    write_connection,
)
from pilot.log import get_logger

log = get_logger(__name__)

NodeConfig = Mapping[str, RunConfigValue]
TlsFiles = tuple[Path | str, Path | str, Path | str]  # (ca_cert, server_cert, server_key) PEM files
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_ADDR_IN_USE = ("address already in use", "errno 98")


def node_config_arg(config: NodeConfig) -> str:
    """``--node-config`` takes the same ``k=v`` syntax as ``--run-config``."""
    return format_run_config(config)


class LocalFederation:
    """SuperLink + N SuperNodes on loopback, insecure, as children of this process."""

    def __init__(
        self,
        app_dir: Path | str,
        num_nodes: int = 2,
        *,
        log_dir: Path | str,
        node_configs: Sequence[NodeConfig] | None = None,
        env: Mapping[str, str] | None = None,
        node_env: Sequence[Mapping[str, str]] | None = None,
        database: bool = False,
        simulation: bool = False,
        tls: TlsFiles | None = None,
        task_poll_interval_s: float = 0.25,
        start_timeout_s: float = 90.0,
        grace_s: float = 5.0,
        handle_signals: bool = True,
    ) -> None:
        """
        app_dir: the Flower app (its pyproject.toml) that ``submit`` runs.
        node_configs: one dict per node for ``--node-config``; the default is
            ``{"partition-id": i, "num-partitions": num_nodes}``.
        env: extra environment for every child (and ``flwr`` CLI call);
            node_env: extra environment per node.
        database: keep SuperLink state in ``log_dir/superlink.db`` (else in memory).
        simulation: start the SuperLink with ``--simulation`` (runs go to the
            Ray simulation engine via ``flwr-simulation``; ``num_nodes`` must be 0
            and ``submit(federation_config={"num-supernodes": N, ...})`` sizes it).
        tls: ``(ca_cert, server_cert, server_key)`` PEM paths: the SuperLink serves
            all its APIs over TLS (``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``;
            the certificate must name 127.0.0.1 in its SANs), nodes verify it with
            ``--root-certificates CA``, and the connection gets ``root-certificates``
            instead of ``insecure = true``. None: ``--insecure`` everywhere.
        grace_s: how long stopping waits after SIGTERM before SIGKILL.
        handle_signals: on SIGINT/SIGTERM inside the ``with`` block, stop every
            child first, then hand the signal to the previous handler.
        """
        if num_nodes < 0:
            raise ValueError("num_nodes must be >= 0")
        if simulation and num_nodes:
            raise ValueError("a simulation SuperLink runs its own virtual nodes: num_nodes must be 0")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"node_configs has {len(node_configs)} entries for {num_nodes} nodes")
        if node_env is not None and len(node_env) != num_nodes:
            raise ValueError(f"node_env has {len(node_env)} entries for {num_nodes} nodes")
        self.app_dir = Path(app_dir).expanduser().resolve()
        self.num_nodes = num_nodes
        self.log_dir = Path(log_dir).expanduser().resolve()
        self.flwr_home = self.log_dir / "flwr-home"
        self.node_configs = [
            dict(c) for c in (node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)])
        ]
        self.node_env = [dict(e) for e in (node_env or [{} for _ in range(num_nodes)])]
        self.database = database
        self.simulation = simulation
        self.tls = tuple(Path(p).expanduser().resolve() for p in tls) if tls else None
        if self.tls and not all(p.is_file() for p in self.tls):
            raise FlowerError(f"TLS files missing: {[str(p) for p in self.tls if not p.is_file()]}")
        self.tag = uuid.uuid4().hex
        self.start_timeout_s = start_timeout_s
        self.grace_s = grace_s
        self.handle_signals = handle_signals
        self.env = flower_env(
            self.flwr_home,
            {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{task_poll_interval_s:g}", **(env or {}), TAG_ENV: self.tag},
        )
        self.superlink_port: int | None = None
        self.node_ports: list[int | None] = [None] * num_nodes
        self.node_ids: list[int | None] = [None] * num_nodes
        self._superlink: Child | None = None
        self._nodes: list[Child | None] = [None] * num_nodes
        self._control: ControlClient | None = None
        self._old_handlers: dict[int, Any] = {}
        self._closed = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------ properties

    @property
    def address(self) -> str:
        """The SuperLink's one HTTP address (Fleet + Control + ServerAppIo)."""
        if self.superlink_port is None:
            raise FlowerError("the SuperLink has not been started")
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def connection(self) -> str:
        return CONNECTION

    @property
    def control(self) -> ControlClient:
        if self._control is None:
            if self.tls:
                self._control = ControlClient(self.address, insecure=False, root_certificates=self.tls[0].read_bytes())
            else:
                self._control = ControlClient(self.address, insecure=True)
        return self._control

    def pids(self) -> list[int]:
        """Every live process this federation started (daemons, SuperExecs, apps)."""
        children = [c for c in [self._superlink, *self._nodes] if c is not None]
        pids = {p.pid for c in children for p in c.tree()}
        pids.update(p.pid for p in tagged_processes(self.tag))
        return sorted(pids)

    def node_pids(self, i: int) -> list[int]:
        """Node ``i``'s live process tree (supernode, its SuperExec, running ClientApps)."""
        node = self._nodes[i]
        return sorted(p.pid for p in node.tree()) if node is not None else []

    def node_alive(self, i: int) -> bool:
        node = self._nodes[i]
        return node is not None and node.running

    def log_path(self, name: str) -> Path:
        """``superlink`` or ``supernode-<i>``: that child's log file."""
        return self.log_dir / f"{name}.log"

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalFederation:
        if self.handle_signals:
            self._install_signal_handlers()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> LocalFederation:
        """Start the SuperLink and every SuperNode together; wait until all are ready.

        The nodes are spawned right after the SuperLink (they retry until it
        answers), so their ~5 s of imports overlap with its own.
        """
        self._closed = False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        for attempt in range(3):
            port = free_port()
            self._spawn_superlink(port)
            for i in range(self.num_nodes):
                self._spawn_node(i)
            error = self._wait_superlink(port)
            if error is None:
                break
            assert self._superlink is not None
            tail = self._superlink.log_text(limit=3000)
            self._stop_all()
            if attempt == 2 or not any(s in tail.lower() for s in _ADDR_IN_USE):
                raise FlowerError(f"flower-superlink on port {port} did not start: {error}\n{tail}")
        log.info("flower.superlink.ready", address=self.address, seconds=round(time.monotonic() - t0, 2))
        for i in range(self.num_nodes):
            self._wait_node(i)
        log.info("flower.federation.ready", nodes=self.num_nodes, node_ids=self.node_ids,
                 seconds=round(time.monotonic() - t0, 2))
        return self

    def close(self) -> None:
        """Stop every child tree (nodes first, then the SuperLink). Idempotent."""
        with self._lock:
            if self._control is not None:
                with contextlib.suppress(Exception):
                    self._control.close()
                self._control = None
            self._stop_all()
            self._restore_signal_handlers()
            if not self._closed:
                log.info("flower.federation.stopped", log_dir=str(self.log_dir))
            self._closed = True

    def _stop_all(self) -> None:
        for i, node in enumerate(self._nodes):
            if node is not None:
                node.stop(self.grace_s)
                self._nodes[i] = None
        if self._superlink is not None:
            self._superlink.stop(self.grace_s)
            self._superlink = None
        self.superlink_port = None
        stray = kill_tagged(self.tag, grace_s=min(self.grace_s, 2.0))  # left the tree (e.g. Ray workers)
        if stray:
            log.warning("flower.federation.stray_killed", pids=stray)

    def _spawn_superlink(self, port: int) -> Child:
        write_connection(self.flwr_home, f"{LOOPBACK}:{port}", root_certificates=self.tls[0] if self.tls else None)
        if self.tls:
            ca, cert, key = self.tls
            security = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(ca)]
        else:
            security = ["--insecure"]
        argv = [
            str(bin_dir() / "flower-superlink"), *security,
            "--host", LOOPBACK, "--port", str(port),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if self.database:
            argv += ["--database", str(self.log_dir / "superlink.db")]
        if self.simulation:
            argv.append("--simulation")
        self._superlink = Child("superlink", argv, self.log_path("superlink"), self.env, cwd=self.log_dir).start()
        self.superlink_port = port
        return self._superlink

    def _wait_superlink(self, port: int) -> str | None:
        """None once ``GET /health`` answers 200; else why not."""
        child = self._superlink
        assert child is not None
        deadline = time.monotonic() + self.start_timeout_s
        scheme = "https" if self.tls else "http"
        url = f"{scheme}://{LOOPBACK}:{port}/health"
        context = ssl.create_default_context(cafile=str(self.tls[0])) if self.tls else None
        while time.monotonic() < deadline:
            if not child.running:
                return f"exited with code {child.proc.returncode if child.proc else '?'}"
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(url, timeout=1.0, context=context) as res:  # noqa: S310 (loopback)
                    if res.status == 200:
                        child.remember_descendants()
                        return None
            time.sleep(0.1)
        return f"/health did not answer within {self.start_timeout_s:g}s"

    def _spawn_node(self, i: int) -> Child:
        port = free_port()
        security = ["--root-certificates", str(self.tls[0])] if self.tls else ["--insecure"]
        argv = [
            str(bin_dir() / "flower-supernode"), *security,
            "--superlink", self.address,
            "--host", LOOPBACK, "--port", str(port),
            "--isolation", "subprocess",
        ]  # fmt: skip
        if self.node_configs[i]:
            argv += ["--node-config", node_config_arg(self.node_configs[i])]
        # Own FLWR_HOME per node: flwr-clientapp installs the FAB into FLWR_HOME/apps
        # with an "exists? then done" check, so two ClientApps sharing a home can
        # race on a run's first messages and import a half-copied app.
        env = {**self.env, "FLWR_HOME": str(self.log_dir / f"flwr-home-node-{i}"), **self.node_env[i]}
        child = Child(f"supernode-{i}", argv, self.log_path(f"supernode-{i}"), env, cwd=self.log_dir).start()
        self._nodes[i] = child
        self.node_ports[i] = port
        self.node_ids[i] = None
        return child

    def _wait_node(self, i: int) -> int:
        child = self._nodes[i]
        port = self.node_ports[i]
        assert child is not None and port is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not child.running:
                tail = child.log_text(limit=3000)
                if any(s in tail.lower() for s in _ADDR_IN_USE):  # lost a port race: try another
                    child.stop(0)
                    self._spawn_node(i)
                    return self._wait_node(i)
                raise FlowerError(f"supernode-{i} exited with code {child.proc.returncode if child.proc else '?'}:\n{tail}")
            match = _NODE_ID.search(child.log_text())
            if match and port_open(LOOPBACK, port):
                self.node_ids[i] = int(match.group(1))
                child.remember_descendants()
                return self.node_ids[i]  # type: ignore[return-value]
            time.sleep(0.1)
        tail = child.log_text(limit=3000)
        raise FlowerError(f"supernode-{i} was not ready within {self.start_timeout_s:g}s:\n{tail}")

    # ---------------------------------------------------------- node control

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop node ``i`` and its SuperExec/ClientApps.

        SIGKILL (default) is a crash: the SuperLink notices only when the node's
        heartbeats stop (~50 s in 1.41: interval 30 s, patience 2), then answers
        its pending messages with a NODE_UNAVAILABLE error reply. SIGTERM is a
        graceful leave: the node deactivates and unregisters at once.
        """
        node = self._nodes[i]
        if node is None:
            return
        node.stop(self.grace_s if sig != signal.SIGKILL else 0.0, sig=sig)
        self._nodes[i] = None
        self.node_ids[i] = None
        log.info("flower.supernode.killed", index=i, signal=signal.Signals(sig).name)

    def start_node(self, i: int) -> int:
        """(Re)start node ``i`` with its node-config; return its new Flower node id.

        Flower gives a restarted SuperNode a new node id (no auth keys here), so
        Pilot identifies trainers by their own id in the node-config, not by this.
        """
        if self.node_alive(i):
            return self.node_ids[i]  # type: ignore[return-value]
        self._spawn_node(i)
        return self._wait_node(i)

    # ------------------------------------------------------------------ runs

    def submit(
        self,
        run_config: Mapping[str, RunConfigValue] | None = None,
        *,
        app_dir: Path | str | None = None,
        via: str = "cli",
        federation_config: Mapping[str, RunConfigValue] | None = None,
        timeout_s: float = 180.0,
    ) -> int:
        """Start a run of the app with ``run_config`` overrides; its run id.

        ``via="cli"``: ``flwr run APP pilot-local --run-config '...' --format json``
        (the public path; ~4-9 s of CLI start-up on 2 cores). ``via="api"``: the
        same FAB build + Control API StartRun in-process (~0.1 s once flwr is
        imported). Keys and types are checked against the app's defaults first.
        ``federation_config`` (simulation only): ``num-supernodes``,
        ``client-resources-num-cpus`` (int), ``client-resources-num-gpus`` (float,
        fractions allowed), ``backend``, ``verbose``, ``init-args-num-cpus``,
        ``init-args-num-gpus``, ``init-args-logging-level``, ``init-args-log-to-driver``
        (``flwr run --federation-config "k=v ..."``).
        """
        app = Path(app_dir).expanduser().resolve() if app_dir else self.app_dir
        checked = check_run_config(run_config or {}, app_run_config_defaults(app))
        t0 = time.monotonic()
        if via == "cli":
            arg = format_run_config(checked) if checked else None
            fed_arg = format_run_config(federation_config) if federation_config else None
            run_id = flwr_run(str(bin_dir() / "flwr"), app, CONNECTION, self.env, arg,
                              federation_config=fed_arg, timeout_s=timeout_s)
        elif via == "api":
            run_id = self.control.start_run(app, checked, federation_config=federation_config)
        else:
            raise ValueError(f"via must be 'cli' or 'api', not {via!r}")
        log.info("flower.run.submitted", run_id=run_id, app=str(app), via=via, seconds=round(time.monotonic() - t0, 2))
        return run_id

    def status(self, run_id: int) -> RunStatus:
        return self.control.status(run_id)

    def wait(self, run_id: int, timeout: float, poll_s: float = 0.5) -> RunStatus:
        """Poll until the run is finished; its final RunStatus (check ``.failed``).

        Raises RunTimeout (with ``.status``) if it is not finished in ``timeout``
        seconds, and FlowerError if the SuperLink died meanwhile.
        """
        deadline = time.monotonic() + timeout
        last: RunStatus | None = None
        while True:
            if self._superlink is None or not self._superlink.running:
                raise FlowerError(f"the SuperLink is not running (run {run_id}); see {self.log_path('superlink')}")
            last = self.status(run_id)
            if last.finished:
                self._save_run_log(run_id, last)
                return last
            if time.monotonic() >= deadline:
                raise RunTimeout(f"run {run_id} still {last.text} after {timeout:g}s", last)
            time.sleep(poll_s)

    def stop_run(self, run_id: int) -> bool:
        """Ask the SuperLink to stop the run (``flwr stop``); True if it accepted."""
        return self.control.stop(run_id)

    def run_logs(self, run_id: int) -> str:
        """The ServerApp's log as the SuperLink holds it (``flwr log ID --show``)."""
        return self.control.logs(run_id)

    def _save_run_log(self, run_id: int, status: RunStatus) -> None:
        with contextlib.suppress(Exception):
            text = self.run_logs(run_id)
            (self.log_dir / f"run-{run_id}.log").write_text(f"# {status.text} {status.details}\n{text}", encoding="utf-8")

    # --------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old_handlers = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        log.warning("flower.federation.signal", signal=signal.Signals(signum).name)
        self.close()  # restores the old handlers
        if callable(old):
            old(signum, frame)
        elif old == signal.SIG_DFL:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

