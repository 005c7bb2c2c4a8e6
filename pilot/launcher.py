"""``pilot run``: a whole federated run on one box, every service started and stopped for you.

:func:`run_local` starts, on loopback: the embedded Redis (unless a URL is
given), the evaluator worker (a Celery process; not with ``eval-inline``, where
the coordinator scores checkpoints itself), a thread copying the run's
events into ``<run_dir>/events.jsonl``, and a Flower SuperLink with N
SuperNodes (:class:`~pilot.flower.LocalFederation`); submits the run with the
validated run config; shows live progress (round, time left, per-trainer
tokens/s and loss, BPB as it arrives); waits for the last evaluation; writes the
report. On Ctrl-C or any failure every child process it started is stopped, and a
Flower run that *failed* (``flwr run`` itself would exit 0) is reported as such.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot import paths
from pilot.bus import Bus, redis_client
from pilot.errors import DataError, PilotError
from pilot.eventlog import EventLogWriter, event_log_path
from pilot.flower import LocalFederation, app_run_config_defaults
from pilot.live import RunMonitor
from pilot.log import get_logger
from pilot.redis_server import EmbeddedRedis
from pilot.run_config import RunConfig
from pilot.sources import resolve_named_source
from services.evaluator.results import ResultStore

log = get_logger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: the repo's pyproject.toml


class RunFailed(PilotError):
    """The Flower run finished without completing (the ServerApp raised, or it was stopped)."""


@dataclass
class LocalRunResult:
    run_dir: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per-round summary rows
    evals: list[dict[str, Any]] = field(default_factory=list)  # the stored evaluation results, by round
    report: Path | None = None
    wall_s: float = 0.0


def flower_values(cfg: RunConfig) -> dict[str, Any]:
    """The config as Flower run-config values: no nulls (the app's defaults say "unset")."""
    defaults = app_run_config_defaults(APP_DIR)
    values: dict[str, Any] = {}
    for key, value in cfg.as_run_config().items():
        if value is None:
            value = defaults.get(key, "")
        values[key] = value
    return values


def _start_evaluator(cfg: RunConfig, redis_url: str, log_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    from services.evaluator.evaluation import run_eval_settings

    log_dir.mkdir(parents=True, exist_ok=True)
    settings = run_eval_settings(cfg, cfg.shard_dir())  # the shards the coordinator uses: same split
    command = [sys.executable, "-m", "pilot.cli", "evaluator", "--redis", redis_url, "--data", str(settings.data),
               "--device", settings.device, "--eval-tokens", str(settings.eval_tokens),
               "--prompt", settings.prompt, "--sample-tokens", str(settings.sample_tokens),
               "--temperature", str(settings.temperature), "--top-k", str(settings.top_k or 0),
               "--threads", "1", "--no-wandb" if not cfg.wandb_project else "--wandb"]
    if cfg.wandb_project:
        command += ["--wandb-project", cfg.wandb_project]
    handle = open(log_dir / "evaluator.log", "ab")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle.close()
    return process


def _stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(5)


def stop_trainer_hosts(run_id: str, trainer_ids: list[str], grace_s: float = 5.0) -> list[int]:
    """Stop the trainer hosts (``services/trainer/host.py``) of this run's local trainers; their pids.

    ``pilot run`` calls this before it stops the SuperNodes, so the hosts exit cleanly
    and nothing of the run is left when it returns. (A host would also exit by itself
    once its SuperNode is gone, and the federation's final sweep would kill one still
    running, by its inherited tag, as a stray.)
    """
    from services.trainer.host_client import stop_host
    from services.trainer.identity import default_work_dir

    stopped = [stop_host(default_work_dir(run_id, trainer_id), grace_s) for trainer_id in trainer_ids]
    return [pid for pid in stopped if pid]


def reset_local_trainers(run_id: str, trainer_ids: list[str]) -> list[Path]:
    """``fresh``: the local trainers start without the inner optimiser / residual an earlier run left."""
    from services.trainer.identity import default_work_dir, reset_trainer_state

    removed = [path for trainer_id in trainer_ids for path in reset_trainer_state(default_work_dir(run_id, trainer_id))]
    if removed:
        log.warning("fresh start: trainer state of an earlier run removed", paths=[str(p) for p in removed])
    return removed


def _wait_for_evaluations(results: ResultStore, monitor: RunMonitor, last_round: int, timeout_s: float) -> None:
    """Wait (bounded) until every round's checkpoint has a result, ok or failed."""
    deadline = time.monotonic() + timeout_s
    for round in range(0, last_round + 1):
        if results.wait(round, max(deadline - time.monotonic(), 0.0)) is None:
            log.warning("evaluation still pending when the run ended", round=round, timeout_s=timeout_s)
            break
    monitor.poll()


def run_local(
    cfg: RunConfig,
    trainers: int,
    *,
    redis_url: str | None = None,
    timeout_s: float | None = None,
    eval_wait_s: float = 300.0,
    live: bool = True,
) -> LocalRunResult:
    """Run ``cfg`` federated across ``trainers`` local trainers; returns the summary."""
    from pilot.report import write_report

    # fail fast (no internet for 'shakespeare', a missing file) before starting anything, and hand the
    # services an absolute path: they do not share this process's working directory
    data = resolve_named_source(cfg.data).expanduser().resolve()
    if not data.exists():
        raise DataError(f"data path {cfg.data} does not exist")
    cfg = cfg.model_copy(update={"data": data})
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir = run_dir / "logs"
    started = time.monotonic()
    threads_per_trainer = max(1, (os.cpu_count() or 1) // trainers)  # CPU trainers must not fight over cores
    with ExitStack() as stack:
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedRedis(run_dir / "redis")).url
        env = {**os.environ, "PILOT_REDIS_URL": redis_url, "PILOT_BASE_DIR": str(paths.base_dir())}
        bus = Bus(redis_client(redis_url), cfg.run_id)
        writer = EventLogWriter(bus, event_log_path(run_dir))
        writer.start()
        stack.callback(writer.stop)
        if cfg.evaluate and not cfg.eval_inline:
            evaluator = _start_evaluator(cfg, redis_url, log_dir, env)
            stack.callback(_stop_process, evaluator)
        trainer_ids = [f"trainer-{i}" for i in range(trainers)]
        if cfg.fresh:
            reset_local_trainers(cfg.run_id, trainer_ids)
        federation = stack.enter_context(LocalFederation(
            APP_DIR, trainers, log_dir=log_dir,
            node_configs=[{"trainer-id": trainer_id, "partition-id": i, "num-partitions": trainers}
                          for i, trainer_id in enumerate(trainer_ids)],
            env={"PILOT_REDIS_URL": redis_url, "PILOT_BASE_DIR": str(paths.base_dir())},
            node_env=[{"OMP_NUM_THREADS": str(threads_per_trainer)}] * trainers,
        ))
        # before the nodes stop: a host stopped by the federation's final sweep would be killed as a stray
        stack.callback(stop_trainer_hosts, cfg.run_id, trainer_ids)
        values = {**flower_values(cfg), "redis-url": redis_url, "out": str(run_dir)}
        flower_run = federation.submit(values, via="api")
        log.info("run submitted", flower_run=flower_run, run_dir=str(run_dir), trainers=trainers)
        monitor = stack.enter_context(RunMonitor(bus, cfg, enabled=live))
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while True:
            monitor.poll()
            status = federation.status(flower_run)
            if status.finished:
                break
            if deadline and time.monotonic() > deadline:
                federation.stop_run(flower_run)
                raise RunFailed(f"run {cfg.run_id} did not finish within {timeout_s:g} s; stopped it")
            time.sleep(1.0)
        monitor.poll()
        if status.failed:
            logs = federation.run_logs(flower_run)
            (log_dir / "serverapp.log").write_text(logs)
            raise RunFailed(
                f"run {cfg.run_id} {status.sub_status}: {status.details or 'see the log'} "
                f"(coordinator log: {log_dir / 'serverapp.log'})"
            )
        results = ResultStore(bus.client, cfg.run_id)
        if cfg.evaluate:
            _wait_for_evaluations(results, monitor, monitor.last_closed_round, eval_wait_s)
        rounds = monitor.summary_rows()
        eval_results = [r.to_dict() for r in results.all()]
    report = write_report(run_dir, eval_results=eval_results)
    return LocalRunResult(run_dir=run_dir, rounds=rounds, evals=eval_results, report=report,
                          wall_s=time.monotonic() - started)


