"""The tokenizer worker: a Celery worker on ``TOKENIZER_QUEUE`` running ``train_tokenizer``.

``run_worker(config)`` (what ``pilot tokenizer worker`` calls) runs a Celery
worker with ``acks_late`` and prefetch 1 from :func:`pilot.jobs.make_celery`,
the ``solo`` pool (one job at a time: the Rust trainer already uses every core).
``celery -A services.tokenizer.worker worker -Q pilot.tokenizer --pool solo``
works too: settings then come from ``$PILOT_REDIS_URL`` and
``$PILOT_TOKENIZER_OUT_DIR`` (see :meth:`WorkerConfig.from_env`).

The task (``pilot.tokenizer.train_tokenizer``, payload = ``encode_job(TrainTokenizerJob)``):

1. the job id is derived from the job (services/tokenizer/queue.py); a job whose
   status is ``ok`` and whose artifact is in place with the recorded sha256 is
   skipped (a duplicate or redelivered message never trains twice);
2. otherwise it trains with :func:`pilot.bpe.train_bpe`, publishing progress to
   the job's status hash (services/tokenizer/status.py), and saves the artifact
   to ``job.out`` (atomic: write, fsync, rename);
3. the status becomes ``ok`` with the tokenizer's sha256, the artifact file's
   sha256 and the vocab size, or ``failed`` with the reason.

Paths: a relative ``input`` is taken under ``$PILOT_BASE_DIR``, a relative
``out`` under the worker's ``out_dir``, and an empty ``out`` is
``out_dir/<job id>``; never under the current directory.

Errors: a Redis outage is retried by Celery with backoff and jitter (at most
``max_retries`` times). Everything else (vocab below 256 + specials, empty
corpus, invalid UTF-8, a missing input, a split pattern that does not compile,
an unwritable ``out``, or an unexpected exception) is recorded as failed at
once, never retried, and the worker goes on with the next job.
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
from pilot.hashing import sha256_file
from pilot.jobs import (
    BadJob,
    TOKENIZER_QUEUE,
    WorkerSlot,
    celery_worker_argv,
    decode_job,
    make_celery,
    retrying_task,
)
from pilot.log import get_logger
from pilot.paths import base_dir, tokenizer_dir
from pilot.tokenizer import read_artifact
from pilot.v1.jobs_pb2 import TrainTokenizerJob

from services.tokenizer.queue import TASK_ID_PREFIX, TRAIN_TASK, check_job, tokenizer_job_id
from services.tokenizer.status import JobStatus, JobStatusStore, ProgressPublisher

log = get_logger(__name__)

OUT_DIR_ENV = "PILOT_TOKENIZER_OUT_DIR"
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RetryableError,
    RedisUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
)
"""Errors worth retrying: Redis (the broker and the status store) being briefly away."""
DEFAULT_MAX_RETRIES = 3
RETRY_BACKOFF_S = 2
RETRY_BACKOFF_MAX_S = 60


@dataclass(frozen=True)
class WorkerConfig:
    """Everything ``pilot tokenizer worker`` configures."""

    redis_url: str
    out_dir: Path = field(default_factory=tokenizer_dir)  # relative / empty job.out lands here
    queue: str = TOKENIZER_QUEUE
    threads: int | None = None  # Rust trainer threads (None: all cores)
    max_retries: int = DEFAULT_MAX_RETRIES

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.max_retries < 0:
            raise ConfigError(f"max-retries must be >= 0, got {self.max_retries}")
        if not self.queue:
            raise ConfigError("queue must not be empty")

    @classmethod
    def from_env(cls) -> WorkerConfig:
        """Settings for ``celery -A services.tokenizer.worker``: ``$PILOT_REDIS_URL``, ``$PILOT_TOKENIZER_OUT_DIR``."""
        url = os.environ.get(REDIS_URL_ENV)
        if not url:
            raise ConfigError(f"no Redis URL: set ${REDIS_URL_ENV}")
        out_dir = os.environ.get(OUT_DIR_ENV)
        return cls(redis_url=url, out_dir=Path(out_dir) if out_dir else tokenizer_dir())


class TokenizerWorker:
    """The worker's state: its config, a Redis client and the job status store."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.client = redis_client(config.redis_url)
        self.store = JobStatusStore(self.client)

    def run_task(self, payload: str, *, task_id: str, attempt: int = 0, max_retries: int = 0) -> dict[str, Any]:
        """The body of the Celery task: decode, train idempotently, return the status as a dict."""
        try:
            job = check_job(decode_job(TrainTokenizerJob, payload))
        except BadJob as exc:
            job_id = task_id.removeprefix(TASK_ID_PREFIX)
            log.error("tokenizer job cannot be decoded", task_id=task_id, reason=str(exc))
            try:
                self.store.failed(job_id, str(exc))
            except ConfigError:
                pass  # a task id that is no job id: nothing to record it under
            return {"job_id": job_id, "state": "failed", "reason": str(exc)}
        status, skipped = self.handle(job, attempt=attempt, max_retries=max_retries)
        return {**status.to_dict(), "skipped": skipped}

    def resolve(self, job: TrainTokenizerJob, job_id: str) -> tuple[Path, Path]:
        """The input and output paths of ``job`` (see the module docstring)."""
        source = Path(job.input).expanduser()
        out = Path(job.out).expanduser() if job.out else Path(job_id)
        return (source if source.is_absolute() else base_dir() / source,
                out if out.is_absolute() else self.config.out_dir / out)

    def handle(self, job: TrainTokenizerJob, *, attempt: int = 0, max_retries: int = 0) -> tuple[JobStatus, bool]:
        """Train ``job`` unless it is already done; returns (final status, skipped).

        Raises a transient error (for Celery to retry) while ``attempt < max_retries``.
        """
        job_id = tokenizer_job_id(job)
        source, out = self.resolve(job, job_id)
        existing = self.store.get(job_id)
        if existing is not None and existing.ok and _artifact_matches(out, existing.sha256):
            log.info("tokenizer job already done", job_id=job_id, out=str(out), sha256=existing.sha256)
            return existing, True
        started = time.perf_counter()
        try:
            self.store.running(job_id, job, out=str(out), attempts=attempt + 1)
            self._train(job, job_id, source, out, started)
        except TRANSIENT_ERRORS as exc:
            if attempt < max_retries:
                log.warning("transient error in tokenizer job, will retry", job_id=job_id, attempt=attempt + 1,
                            error=f"{type(exc).__name__}: {exc}")
                raise
            self._fail(job_id, f"gave up after {attempt + 1} attempts: {type(exc).__name__}: {exc}", started)
        except PilotError as exc:
            self._fail(job_id, str(exc), started)
        except OSError as exc:  # e.g. out is not writable: retrying would not help
            self._fail(job_id, f"{type(exc).__name__}: {exc}", started)
        except Exception as exc:  # a bug: record it, do not loop on it
            log.exception("unexpected error in tokenizer job", job_id=job_id)
            self._fail(job_id, f"unexpected {type(exc).__name__}: {exc}", started)
        final = self.store.get(job_id)
        assert final is not None
        return final, False

    def _train(self, job: TrainTokenizerJob, job_id: str, source: Path, out: Path, started: float) -> None:
        from pilot.bpe import discover, train_bpe

        log.info("training tokenizer", job_id=job_id, input=str(source), vocab_size=job.vocab_size, out=str(out))
        tokenizer = train_bpe(
            discover([source]), job.vocab_size,
            max_chars=job.max_chars or None, doc_cap=job.doc_cap or None,
            progress=ProgressPublisher(self.store, job_id), threads=self.config.threads,
        )
        path = tokenizer.save(out)
        elapsed = time.perf_counter() - started
        self.store.succeeded(job_id, sha256=tokenizer.sha256, artifact_sha256=sha256_file(path),
                             vocab_size=tokenizer.vocab_size, out=str(out), elapsed_s=elapsed)
        log.info("tokenizer trained", job_id=job_id, out=str(path), sha256=tokenizer.sha256,
                 vocab_size=tokenizer.vocab_size, seconds=round(elapsed, 2))

    def _fail(self, job_id: str, reason: str, started: float) -> None:
        log.warning("tokenizer job failed", job_id=job_id, reason=reason)
        self.store.failed(job_id, reason, elapsed_s=time.perf_counter() - started)

    def close(self) -> None:
        self.client.close()


def _artifact_matches(out: Path, sha256: str) -> bool:
    try:
        return bool(sha256) and read_artifact(out).get("sha256") == sha256
    except PilotError:
        return False


_slot: WorkerSlot[TokenizerWorker] = WorkerSlot(lambda: TokenizerWorker(WorkerConfig.from_env()))


def current_worker() -> TokenizerWorker:
    """The process's :class:`TokenizerWorker` (built from the environment when ``run_worker`` did not)."""
    return _slot.get()


def create_app(redis_url: str, *, max_retries: int = DEFAULT_MAX_RETRIES) -> Celery:
    """The tokenizer's Celery app with the ``train_tokenizer`` task registered."""
    app = make_celery("pilot.tokenizer", redis_url)

    @retrying_task(app, TRAIN_TASK, transient=TRANSIENT_ERRORS, max_retries=max_retries,
                   backoff_s=RETRY_BACKOFF_S, backoff_max_s=RETRY_BACKOFF_MAX_S)
    def train_tokenizer(self: Any, payload: str) -> dict[str, Any]:
        return current_worker().run_task(
            payload, task_id=str(self.request.id), attempt=self.request.retries, max_retries=self.max_retries
        )

    return app


def __getattr__(name: str) -> Any:
    """``celery -A services.tokenizer.worker``: the app, built from the environment on first access."""
    if name in ("app", "celery"):
        return _slot.app(_app_from_env)
    raise AttributeError(name)


def _app_from_env() -> tuple[TokenizerWorker, Celery]:
    config = WorkerConfig.from_env()
    return TokenizerWorker(config), create_app(config.redis_url, max_retries=config.max_retries)


def worker_argv(config: WorkerConfig) -> list[str]:
    """The ``celery worker`` arguments for ``config``."""
    return celery_worker_argv(config.queue, name="tokenizer", concurrency=1)


def run_worker(config: WorkerConfig) -> None:
    """Run the tokenizer worker until SIGTERM / Ctrl-C."""
    worker = TokenizerWorker(config)
    _slot.set(worker)
    app = create_app(config.redis_url, max_retries=config.max_retries)
    log.info("tokenizer worker starting", queue=config.queue, out_dir=str(config.out_dir),
             threads=config.threads or "all")
    try:
        app.worker_main(worker_argv(config))
    finally:
        worker.close()
        _slot.set(None)
