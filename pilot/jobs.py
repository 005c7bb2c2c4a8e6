"""Celery wiring shared by every Pilot job queue (evaluation, tokenizer training).

- ``make_celery(name, redis_url)``: a Celery app on the Redis broker with the
  settings Pilot's jobs rely on: ``acks_late`` + ``reject_on_worker_lost`` (a job
  whose worker died is redelivered, not lost), prefetch 1 (one job at a time per
  worker), JSON only (never pickle), and every broker/result key under
  ``pilot:celery:`` so Celery's keys sit beside Pilot's, never over them.
- Job payloads are the protobuf messages of ``proto/pilot/v1/jobs.proto``,
  carried as base64 text (``encode_job`` / ``decode_job``), so the schema stays
  the one source of truth for what a job holds.
- Task ids are derived from what the job is about (``evaluation_task_id(run,
  round)``), so enqueueing the same job twice names the same task and the
  worker's idempotency check finds it.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from celery import Celery
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from pilot.errors import PilotError

EVAL_QUEUE = "pilot.eval"
TOKENIZER_QUEUE = "pilot.tokenizer"
CELERY_KEY_PREFIX = "pilot:celery:"

Job = TypeVar("Job", bound=Message)
W = TypeVar("W")


class BadJob(PilotError):
    """A job payload that does not decode as its protobuf message."""


def make_celery(name: str, redis_url: str) -> Celery:
    app = Celery(name, broker=redis_url, backend=redis_url)
    prefix = {"global_keyprefix": CELERY_KEY_PREFIX}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options={**prefix, "visibility_timeout": 3600},
        result_backend_transport_options=prefix,
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_track_started=True,
    )
    return app


def encode_job(job: Message) -> str:
    return base64.b64encode(job.SerializeToString()).decode("ascii")


def decode_job(message_type: type[Job], payload: str) -> Job:
    try:
        raw = base64.b64decode(payload.encode("ascii"), validate=True)
        job = message_type()
        job.ParseFromString(raw)
    except (ProtobufDecodeError, binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise BadJob(f"job payload is not a valid {message_type.__name__}: {exc}") from None
    return job


def evaluation_task_id(run_id: str, round: int) -> str:
    return f"eval:{run_id}:{round}"


def retrying_task(
    app: Celery, name: str, *, transient: tuple[type[BaseException], ...], max_retries: int,
    backoff_s: int = 2, backoff_max_s: int = 120,
):  # type: ignore[no-untyped-def]
    """Register a bound task that retries ``transient`` errors with jittered exponential backoff.

    Every other error is the task's own to record (as a failed result with its reason): Pilot's jobs
    never retry a permanent failure.
    """
    return app.task(
        name=name,
        bind=True,
        autoretry_for=transient,
        retry_backoff=backoff_s,
        retry_backoff_max=backoff_max_s,
        retry_jitter=True,
        max_retries=max_retries,
    )


class WorkerSlot(Generic[W]):
    """A job worker process's one worker object and Celery app.

    The task body reaches the worker with :meth:`get` (built from the environment on first use, as
    under ``celery -A``); ``run_worker`` installs the one it built with :meth:`set`; the module-level
    ``app`` that ``celery -A`` looks up comes from :meth:`app`.
    """

    def __init__(self, build_from_env: Callable[[], W]) -> None:
        self._build = build_from_env
        self._lock = threading.Lock()
        self._worker: W | None = None
        self._app: Celery | None = None

    def get(self) -> W:
        with self._lock:
            if self._worker is None:
                self._worker = self._build()
            return self._worker

    def set(self, worker: W | None) -> None:
        with self._lock:
            self._worker = worker

    def app(self, build: Callable[[], tuple[W, Celery]]) -> Celery:
        """The app (and its worker) built once by ``build`` — from the environment, so bad config fails at start."""
        with self._lock:
            if self._app is None:
                self._worker, self._app = build()
            return self._app


def celery_worker_argv(queue: str, *, name: str, concurrency: int = 1) -> list[str]:
    """``celery worker`` arguments: solo pool for one job at a time (threads beyond), no gossip/mingle/heartbeat."""
    return [
        "worker",
        "--queues", queue,
        "--pool", "solo" if concurrency == 1 else "threads",
        "--concurrency", str(concurrency),
        "--hostname", f"{name}-{os.getpid()}@{socket.gethostname()}",
        "--loglevel", os.environ.get("PILOT_LOG_LEVEL", "INFO"),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
