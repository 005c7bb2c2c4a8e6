"""Submit Flower runs and read their status: the ``flwr`` CLI and the Control API.

A Flower 1.41 SuperLink serves its Control API (what ``flwr run/ls/stop/log``
talk to) as protobuf over HTTP on its one port (``POST /v1/control/start-run``,
``/list-runs``, ``/stop-run``, ``/stream-logs``). This module offers both ways in:

- :func:`flwr_run` shells out to ``flwr run APP CONN --run-config ... --format json``
  (the public interface, the same path a user takes; it builds the FAB) and
  returns the run id from its JSON. ``flwr run`` exits 0 even when the run later
  fails: the outcome is only in the run's status.
- :class:`ControlClient` calls the Control API in-process (``flwr.supercore.control
  .ControlHttpClient``, an internal 1.41 class): a status poll costs ~10 ms
  instead of the ~3.5 s of CPU that starting ``flwr ls`` costs on 2 cores.
- :func:`flwr_ls` / :func:`flwr_stop` / :func:`flwr_log` are the CLI equivalents.

A run's status is ``pending`` -> ``starting`` -> ``running`` -> ``finished``, and a
finished run has a sub-status ``completed``, ``failed`` (``details`` holds the
ServerApp's exception text) or ``stopped``. ``flwr ls --format json`` prints
them joined as ``"status": "finished:failed"``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.errors import PilotError, RetryableError

CONNECTION = "pilot-local"  # the connection name LocalFederation writes to FLWR_HOME/config.toml
FINISHED = "finished"
COMPLETED = "completed"
FAILED = "failed"
STOPPED = "stopped"


class FlowerError(PilotError):
    """A Flower daemon or CLI call failed (the message names the command and its output)."""


class RunTimeout(FlowerError, TimeoutError):
    """A run did not finish in time; ``.status`` is its last status."""

    def __init__(self, message: str, status: RunStatus | None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RunStatus:
    """Where a Flower run stands (timestamps are ISO-8601 UTC strings, "" when not reached)."""

    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str = ""  # "" until finished; then completed | failed | stopped
    details: str = ""  # why it failed, e.g. "ServerApp failed with exception: ..."
    pending_at: str = ""
    starting_at: str = ""
    running_at: str = ""
    finished_at: str = ""

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def succeeded(self) -> bool:
        return self.finished and self.sub_status == COMPLETED

    @property
    def failed(self) -> bool:
        """Finished, but not completed (failed or stopped)."""
        return self.finished and self.sub_status != COMPLETED

    @property
    def text(self) -> str:
        """``status`` or ``status:sub_status``, as ``flwr ls`` prints it."""
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status

    @classmethod
    def from_proto(cls, run: Any) -> RunStatus:
        return cls(
            run_id=int(run.run_id),
            status=run.status.status,
            sub_status=run.status.sub_status,
            details=run.status.details,
            pending_at=run.pending_at,
            starting_at=run.starting_at,
            running_at=run.running_at,
            finished_at=run.finished_at,
        )

    @classmethod
    def from_ls_json(cls, row: Mapping[str, Any]) -> RunStatus:
        """From one entry of ``flwr ls --format json``'s ``runs`` list."""

        def when(key: str) -> str:
            value = str(row.get(key, "") or "")
            return "" if value == "N/A" else value

        status, _, sub = str(row["status"]).partition(":")
        details = str(row.get("status-details", "") or "")
        return cls(
            run_id=int(row["run-id"]),
            status=status,
            sub_status=sub,
            details="" if details == "N/A" else details,
            pending_at=when("pending-at"),
            starting_at=when("starting-at"),
            running_at=when("running-at"),
            finished_at=when("finished-at"),
        )


def _json_from_output(text: str) -> Any:
    """The JSON object in a CLI's stdout (``--format json`` prints one object)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in output")
    return json.loads(text[start : end + 1])


def run_cli(
    argv: Sequence[str], env: Mapping[str, str], timeout_s: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one ``flwr`` command; raise FlowerError with its output when it exits non-zero."""
    try:
        proc = subprocess.run(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise FlowerError(f"`{' '.join(argv)}` did not return within {timeout_s:g}s") from err
    if proc.returncode != 0:
        raise FlowerError(
            f"`{' '.join(argv)}` exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return proc


def flwr_run(
    flwr: str,
    app_dir: Path,
    connection: str,
    env: Mapping[str, str],
    run_config: str | Path | None = None,
    timeout_s: float = 120.0,
    federation_config: str | None = None,
) -> int:
    """``flwr run APP CONN [--run-config ARG] --format json``; the new run's id.

    ``run_config`` is the ``"k=v ..."`` string (see :mod:`pilot.flower.runconfig`)
    or a path to a ``.toml`` file of overrides.
    """
    argv = [flwr, "run", str(app_dir), connection, "--format", "json"]
    if run_config:
        argv += ["--run-config", str(run_config)]
    if federation_config:
        argv += ["--federation-config", federation_config]
    proc = run_cli(argv, env, timeout_s)
    try:
        payload = _json_from_output(proc.stdout)
        if not payload.get("success") or payload.get("run-id") is None:
            raise ValueError(f"success={payload.get('success')}")
        return int(payload["run-id"])
    except (ValueError, KeyError, TypeError) as err:
        raise FlowerError(f"`flwr run` gave no run id ({err}):\n{(proc.stdout + proc.stderr)[-4000:]}") from err


def flwr_ls(flwr: str, connection: str, env: Mapping[str, str], run_id: int | None = None) -> list[RunStatus]:
    """``flwr ls CONN [--run-id ID] --format json`` as RunStatus rows."""
    argv = [flwr, "ls", connection, "--format", "json"]
    if run_id is not None:
        argv += ["--run-id", str(run_id)]
    proc = run_cli(argv, env)
    try:
        payload = _json_from_output(proc.stdout)
        return [RunStatus.from_ls_json(row) for row in payload["runs"]]
    except (ValueError, KeyError, TypeError) as err:
        raise FlowerError(f"`flwr ls` printed no runs ({err}):\n{proc.stdout[-4000:]}") from err


def flwr_stop(flwr: str, run_id: int, connection: str, env: Mapping[str, str]) -> None:
    """``flwr stop RUN_ID CONN``."""
    run_cli([flwr, "stop", str(run_id), connection], env)


def flwr_log(flwr: str, run_id: int, connection: str, env: Mapping[str, str]) -> str:
    """``flwr log RUN_ID CONN --show``: the run's ServerApp log so far."""
    return run_cli([flwr, "log", str(run_id), connection, "--show"], env).stdout


class ControlClient:
    """The SuperLink's Control API, called in-process (insecure loopback or TLS)."""

    def __init__(self, address: str, *, insecure: bool = True, root_certificates: bytes | str | None = None) -> None:
        # Imported here: flwr's import costs ~2 s, and only callers that poll need it.
        from flwr.supercore.control import ControlHttpClient

        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
        self.address = address
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=insecure,
            root_certificates=None if insecure else root_certificates,
            interceptors=[],
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, request: Any) -> Any:
        import httpx

        try:
            return fn(request)
        except httpx.HTTPStatusError as err:
            raise FlowerError(f"Control API {what} at {self.address}: HTTP {err.response.status_code} "
                              f"{err.response.text[:500]}") from err
        except httpx.HTTPError as err:
            raise RetryableError(f"Control API {what} at {self.address} unreachable: {err}") from err

    def start_run(
        self,
        app_dir: Path,
        run_config: Mapping[str, bool | int | float | str] | None = None,
        federation: str = "",
        federation_config: Mapping[str, bool | int | float | str] | None = None,
    ) -> int:
        """What ``flwr run APP`` does, in-process: build the FAB, StartRun; the run id.

        ``run_config`` values go over typed (no string quoting). The FAB is built
        by Flower's own ``build_fab_from_disk`` (same include/exclude rules).
        """
        import hashlib

        from flwr.cli.build import build_fab_from_disk
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab
        from flwr.supercore.utils import simulation_config_from_json

        try:
            fab_bytes = build_fab_from_disk(Path(app_dir))
        except ValueError as err:
            raise FlowerError(f"cannot build a FAB from {app_dir}: {err}") from err
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        sim = None
        if federation_config:
            try:
                sim = simulation_config_from_json({k.replace("-", "_"): v for k, v in federation_config.items()})
            except (ValueError, TypeError) as err:
                raise FlowerError(f"bad federation_config {dict(federation_config)}: {err}") from err
        req = StartRunRequest(
            fab=fab_to_proto(fab),
            override_config=user_config_to_proto(dict(run_config or {})),
            federation=federation,
            override_federation_config=sim,
        )
        res = self._call("StartRun", self._client.StartRun, req)
        if not res.HasField("run_id"):
            raise FlowerError(f"SuperLink at {self.address} did not start a run from {app_dir}")
        return int(res.run_id)

    def runs(self) -> list[RunStatus]:
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._call("ListRuns", self._client.ListRuns, ListRunsRequest())
        return [RunStatus.from_proto(run) for run in res.run_dict.values()]

    def status(self, run_id: int) -> RunStatus:
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._call("ListRuns", self._client.ListRuns, ListRunsRequest(run_id=run_id))
        if run_id not in res.run_dict:
            raise FlowerError(f"SuperLink at {self.address} knows no run {run_id}")
        return RunStatus.from_proto(res.run_dict[run_id])

    def stop(self, run_id: int) -> bool:
        from flwr.proto.control_pb2 import StopRunRequest

        return bool(self._call("StopRun", self._client.StopRun, StopRunRequest(run_id=run_id)).success)

    def logs(self, run_id: int) -> str:
        """The ServerApp's log so far (what ``flwr log RUN --show`` prints)."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        stream = self._call("StreamLogs", self._client.StreamLogs, StreamLogsRequest(run_id=run_id, after_timestamp=0.0))
        try:
            for res in stream:
                return str(res.log_output)
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
        return ""


def bin_dir() -> Path:
    return Path(sys.executable).parent


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Flower daemons and CLI calls run with (see module docstring)."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    env.update(extra or {})
    return env


def write_connection(
    flwr_home: Path, address: str, name: str = CONNECTION, root_certificates: Path | None = None
) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one connection ``name`` (the default).

    Insecure (``insecure = true``) unless ``root_certificates`` (the CA's PEM) is given.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    security = (
        f"root-certificates = {json.dumps(str(root_certificates))}\n" if root_certificates else "insecure = true\n"
    )
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}',
        encoding="utf-8",
    )
    return path
