"""The evaluation worker: a Celery worker on ``EVAL_QUEUE`` running ``evaluate_checkpoint``.

``run_worker(config)`` (what ``pilot evaluator`` calls) builds the
:class:`EvalWorker` (validation data resolved now, so a missing path fails at
start), optionally starts the Evaluator gRPC service in the same process, and
runs a Celery worker: ``acks_late`` and prefetch 1 from :func:`pilot.jobs.make_celery`,
the ``solo`` pool at concurrency 1 (one job at a time per device; threads above
that). ``celery -A services.evaluator.worker worker -Q pilot.eval --pool solo``
works too: settings then come from ``$PILOT_REDIS_URL`` and ``$PILOT_EVAL_DATA``
(see :meth:`WorkerConfig.from_env`).

The task (``pilot.evaluator.evaluate_checkpoint``, payload = ``encode_job(EvaluateCheckpointJob)``):

1. a round that already has a stored successful result returns it, nothing recomputed;
2. otherwise :class:`~services.evaluator.evaluation.Evaluator` scores the checkpoint;
3. the result is stored and its ``EvalCompleted`` published in one step
   (:meth:`ResultStore.record`), then logged to wandb.

Errors: transient ones (Redis unreachable, an ``OSError`` reading a file) are
retried by Celery with exponential backoff and jitter, at most ``max_retries``
times, then recorded as failed. Everything else (sha256 mismatch, missing or
corrupt checkpoint, wrong model config, tokenizer mismatch, bad data, or an
unexpected exception) is recorded as failed with the reason at once, never
retried, and the worker goes on with the next job. A payload that does not
decode is logged and dropped (it names no run to record it under).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from pilot.bus import RedisUnavailable, redis_client
from pilot.bus.connection import REDIS_URL_ENV
from pilot.errors import ConfigError, PilotError, RetryableError
from pilot.jobs import (
    BadJob,
    EVAL_QUEUE,
    WorkerSlot,
    celery_worker_argv,
    decode_job,
    make_celery,
    retrying_task,
)
from pilot.log import get_logger
from pilot.v1.jobs_pb2 import EvaluateCheckpointJob

from services.evaluator.evaluation import EvalSettings, Evaluator
from services.evaluator.queue import EVALUATE_TASK, check_job
from services.evaluator.results import EvalResult, ResultStore
from services.evaluator.tracking import WandbSettings, WandbTracker

log = get_logger(__name__)

DATA_ENV = "PILOT_EVAL_DATA"
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RetryableError,
    RedisUnavailable,
    OSError,
    redis.ConnectionError,
    redis.TimeoutError,
)
"""Errors worth retrying: the same job may succeed once Redis or the file system is back."""
DEFAULT_MAX_RETRIES = 5
RETRY_BACKOFF_S = 2  # first retry after up to 2 s (full jitter), then 4, 8, ... capped below
RETRY_BACKOFF_MAX_S = 120


@dataclass(frozen=True)
class WorkerConfig:
    """Everything ``pilot evaluator`` configures."""

    redis_url: str
    eval: EvalSettings
    queue: str = EVAL_QUEUE
    concurrency: int = 1  # jobs at once (1 per device); >1 uses the threads pool
    grpc_address: str | None = None  # serve the Evaluator gRPC API here (host:port), or not at all
    wandb: WandbSettings = field(default_factory=WandbSettings)
    max_retries: int = DEFAULT_MAX_RETRIES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"max-retries must be >= 0, got {self.max_retries}")
        if not self.queue:
            raise ConfigError("queue must not be empty")

    @classmethod
    def from_env(cls) -> WorkerConfig:
        """Settings for ``celery -A services.evaluator.worker``: ``$PILOT_REDIS_URL``, ``$PILOT_EVAL_DATA``."""
        url, data = os.environ.get(REDIS_URL_ENV), os.environ.get(DATA_ENV)
        if not url:
            raise ConfigError(f"no Redis URL: set ${REDIS_URL_ENV}")
        if not data:
            raise ConfigError(f"no validation data: set ${DATA_ENV} to a shard directory or text file")
        return cls(redis_url=url, eval=EvalSettings(data=Path(data)))


class EvalWorker:
    """The worker's state: evaluator (with its caches), Redis client, wandb runs."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.evaluator = Evaluator(config.eval)  # resolves the validation data: fails now if missing
        self.client = redis_client(config.redis_url)
        self.tracker = WandbTracker(config.wandb)

    def store(self, run_id: str) -> ResultStore:
        return ResultStore(self.client, run_id)

    def run_task(self, payload: str, *, attempt: int, max_retries: int) -> dict[str, Any]:
        """The body of the Celery task: decode, evaluate idempotently, return the stored result."""
        try:
            job = check_job(decode_job(EvaluateCheckpointJob, payload))
        except BadJob as exc:
            log.error("dropping an evaluation job that cannot be evaluated", reason=str(exc))
            return {"status": "failed", "reason": str(exc)}
        return self.handle(job, attempt=attempt, max_retries=max_retries).to_dict()

    def handle(self, job: EvaluateCheckpointJob, *, attempt: int = 0, max_retries: int = 0) -> EvalResult:
        """Evaluate ``job`` unless its round already succeeded; store and publish the outcome.

        Raises a transient error (for Celery to retry) while ``attempt < max_retries``.
        """
        store = self.store(job.run_id)
        existing = store.get(job.round)
        if existing is not None:
            log.info("round already evaluated", run_id=job.run_id, round=job.round, bpb=existing.bpb)
            return existing
        started = time.perf_counter()
        attempts = attempt + 1
        try:
            outcome = self.evaluator.evaluate(job.uri, expected_sha256=job.sha256 or None, expected_round=job.round)
            result = EvalResult.succeeded(job, outcome, attempts=attempts)
        except TRANSIENT_ERRORS as exc:
            if attempt < max_retries:
                log.warning("transient evaluation error, will retry", run_id=job.run_id, round=job.round,
                            attempt=attempts, error=f"{type(exc).__name__}: {exc}")
                raise
            reason = f"gave up after {attempts} attempts: {type(exc).__name__}: {exc}"
            result = EvalResult.failed(job, reason, eval_s=time.perf_counter() - started, attempts=attempts)
        except PilotError as exc:
            result = EvalResult.failed(job, str(exc), eval_s=time.perf_counter() - started, attempts=attempts)
        except Exception as exc:  # a bug or e.g. out of memory: record it, do not loop on it
            log.exception("unexpected evaluation error", run_id=job.run_id, round=job.round)
            reason = f"unexpected {type(exc).__name__}: {exc}"
            result = EvalResult.failed(job, reason, eval_s=time.perf_counter() - started, attempts=attempts)
        stored, entry_id = store.record(result)
        if entry_id is None:
            log.info("another delivery stored this round first", run_id=job.run_id, round=job.round)
            return stored
        if stored.ok:
            log.info("evaluation stored", run_id=job.run_id, round=job.round, bpb=stored.bpb, entry_id=entry_id)
        else:
            log.warning("evaluation failed", run_id=job.run_id, round=job.round, reason=stored.reason)
        self.tracker.log(stored)
        return stored

    def close(self) -> None:
        self.tracker.close()
        self.client.close()


_slot: WorkerSlot[EvalWorker] = WorkerSlot(lambda: EvalWorker(WorkerConfig.from_env()))


def current_worker() -> EvalWorker:
    """The process's :class:`EvalWorker` (built from the environment when ``run_worker`` did not)."""
    return _slot.get()


def create_app(redis_url: str, *, max_retries: int = DEFAULT_MAX_RETRIES) -> Celery:
    """The evaluator's Celery app with the ``evaluate_checkpoint`` task registered."""
    app = make_celery("pilot.evaluator", redis_url)

    @retrying_task(app, EVALUATE_TASK, transient=TRANSIENT_ERRORS, max_retries=max_retries,
                   backoff_s=RETRY_BACKOFF_S, backoff_max_s=RETRY_BACKOFF_MAX_S)
    def evaluate_checkpoint(self: Any, payload: str) -> dict[str, Any]:
        return current_worker().run_task(payload, attempt=self.request.retries, max_retries=self.max_retries)

    return app


def __getattr__(name: str) -> Any:
    """``celery -A services.evaluator.worker``: the app, built from the environment on first access.

    The worker state is built at the same time, so a missing ``$PILOT_EVAL_DATA`` fails at start.
    """
    if name in ("app", "celery"):
        return _slot.app(_app_from_env)
    raise AttributeError(name)


def _app_from_env() -> tuple[EvalWorker, Celery]:
    config = WorkerConfig.from_env()
    return EvalWorker(config), create_app(config.redis_url, max_retries=config.max_retries)


def worker_argv(config: WorkerConfig) -> list[str]:
    """The ``celery worker`` arguments for ``config``."""
    return celery_worker_argv(config.queue, name="evaluator", concurrency=config.concurrency)


def run_worker(config: WorkerConfig) -> None:
    """Run the evaluation worker (and the gRPC service when configured) until SIGTERM / Ctrl-C."""
    worker = EvalWorker(config)
    _slot.set(worker)
    app = create_app(config.redis_url, max_retries=config.max_retries)
    server = None
    if config.grpc_address:
        from services.evaluator.grpc_server import serve_evaluator

        server = serve_evaluator(worker.client, app, config.grpc_address, queue=config.queue)
    log.info("evaluator starting", queue=config.queue, concurrency=config.concurrency,
             device=str(worker.evaluator.device), validation=str(worker.evaluator.val_shard),
             eval_tokens=config.eval.eval_tokens or "all", grpc=server.port if server else None)
    try:
        app.worker_main(worker_argv(config))
    finally:
        if server is not None:
            server.stop(grace_s=2.0)
        worker.close()
        _slot.set(None)
