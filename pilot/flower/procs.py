"""Child processes that leave nothing behind: own session, log file, tree kill.

Flower's daemons start helpers of their own: ``flower-superlink`` starts a
``flower-superexec`` *in a new session* (so killing the SuperLink's process
group misses it), that SuperExec starts one ``flwr-serverapp`` per run, and each
``flower-supernode`` starts a ``flower-superexec`` that starts one
``flwr-clientapp`` per message. They all watch their parent's pid and exit
when it goes, but only after a poll, and a SIGKILLed parent leaves them to
notice on their own. So :class:`Child` stops a whole tree:

1. snapshot the descendants (``psutil``, following parent links, which
   crosses session boundaries);
2. SIGTERM the child's process group and every snapshotted descendant;
3. after ``grace_s``, SIGKILL whatever of the group, the snapshot and any
   descendants seen since is still alive; reap the child.

Every child also carries ``PILOT_FLOWER_TAG=<tag>`` in its environment, which
its own children inherit, so :func:`kill_tagged` finds even processes that
left the tree (Ray workers re-parent to init) and a final sweep by tag
leaves nothing behind.

Each child runs in its own session (``start_new_session``), so a Ctrl-C in the
parent's terminal does not reach it before the parent decides, and on Linux it
gets SIGTERM when the thread that started it ends (``PR_SET_PDEATHSIG``), so a
parent killed with SIGKILL still takes its children along (start children from
the main thread or another long-lived one).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from pilot.log import get_logger

log = get_logger(__name__)

LOOPBACK = "127.0.0.1"
TAG_ENV = "PILOT_FLOWER_TAG"  # set in every child's env; inherited by everything it starts
_PR_SET_PDEATHSIG = 1


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that is free right now (the caller may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent thread ends."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if _alive(p)]
    except psutil.Error:
        return []


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment has ``PILOT_FLOWER_TAG=tag``.

    Catches what re-parents itself away from the tree (Ray's workers in a
    simulation run end up children of init) as long as it inherited the env.
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TAG_ENV) == tag and _alive(proc):
                found.append(proc)
    return found


def kill_tagged(tag: str, grace_s: float = 2.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every process tagged ``tag``; their pids."""
    return terminate(tagged_processes(tag), grace_s)


def terminate(procs: Sequence[psutil.Process], grace_s: float = 2.0) -> list[int]:
    """SIGTERM ``procs``, then SIGKILL those alive after ``grace_s``; their pids."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


class Child:
    """One long-running child process: its own session, stdout+stderr to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path | None = None,
        die_with_parent: bool = True,  # False: a daemon that outlives the thread (and process) starting it
    ) -> None:
        self.name = name
        self.die_with_parent = die_with_parent
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}  # descendants seen so far (pid -> handle)
        self.log_offset = 0  # where this start's output begins in the (appended) log

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Child:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== pilot: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_pdeathsig_hook() if self.die_with_parent else None,
            )
        self._known = {}
        log.debug("flower.child.started", name=self.name, pid=self.proc.pid, argv=self.argv)
        return self

    def remember_descendants(self) -> None:
        """Record the current descendants, so a later stop finds them even if re-parented."""
        if self.proc is not None and self.proc.poll() is None:
            for p in descendants(self.proc.pid):
                self._known.setdefault(p.pid, p)

    def log_text(self, since_start: bool = True, limit: int | None = None) -> str:
        """This child's log (from its latest start by default); the last ``limit`` chars."""
        try:
            with open(self.log_path, "rb") as fh:
                if since_start:
                    fh.seek(self.log_offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return text[-limit:] if limit else text

    def tree(self) -> list[psutil.Process]:
        """The child and its known and current descendants that are still alive."""
        procs: dict[int, psutil.Process] = {}
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                procs[self.proc.pid] = psutil.Process(self.proc.pid)
            for p in descendants(self.proc.pid):
                self._known.setdefault(p.pid, p)
        for pid, p in self._known.items():
            if _alive(p):
                procs[pid] = p
        return list(procs.values())

    def _signal_all(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)  # pgid == pid: start_new_session
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    def stop(self, grace_s: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop the child and all its descendants; return the child's exit code.

        ``sig`` goes to the whole tree first (SIGTERM: graceful; SIGKILL: a crash);
        anything alive after ``grace_s`` gets SIGKILL. Idempotent.
        """
        if self.proc is None:
            return None
        self.remember_descendants()
        self._signal_all(sig)
        deadline = time.monotonic() + max(grace_s, 0.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self.tree():
                break
            time.sleep(0.05)
        leftovers = self.tree()
        if leftovers or self.proc.poll() is None:
            if sig != signal.SIGKILL:
                log.warning(
                    "flower.child.kill",
                    name=self.name,
                    after_s=grace_s,
                    pids=[p.pid for p in leftovers],
                )
            self._signal_all(signal.SIGKILL)
        code = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = self.proc.wait(timeout=10)
        psutil.wait_procs([p for p in self._known.values() if _alive(p)], timeout=5)
        self._known = {}
        log.debug("flower.child.stopped", name=self.name, code=code)
        return code


def leftover_processes(pids: Sequence[int]) -> list[int]:
    """Those of ``pids`` still alive (zombies count as gone): for tests and checks."""
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if _alive(psutil.Process(pid)):
                alive.append(pid)
    return alive
