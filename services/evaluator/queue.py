"""Enqueueing evaluation jobs: what the coordinator (and the Evaluator gRPC service) call.

The coordinator does not import the worker (no torch, no model code): it needs
a Celery app on the Redis broker and :func:`enqueue_evaluation`::

    from pilot.jobs import make_celery
    from services.evaluator.queue import enqueue_evaluation
    from pilot.v1.jobs_pb2 import EvaluateCheckpointJob

    app = make_celery("pilot.coordinator", redis_url)        # once
    task_id = enqueue_evaluation(app, EvaluateCheckpointJob(
        run_id=run_id, round=r, uri=str(checkpoint_dir),
        sha256=sha256_file(checkpoint_dir / "checkpoint.json"), tokens=tokens_seen))

Round 0 is the run's initial weights, evaluated like any round. It never
waits for the evaluation. The task id is ``eval:<run>:<round>``
(:func:`pilot.jobs.evaluation_task_id`); a job enqueued twice is evaluated once,
because the worker checks the stored result first. Jobs wait in the Redis list
``EVAL_QUEUE`` (``pilot.eval``) in FIFO order, so a worker that was down works
through the backlog in the order the rounds closed.
"""

from __future__ import annotations

from celery import Celery

from pilot import keys
from pilot.errors import ConfigError, RetryableError
from pilot.jobs import EVAL_QUEUE, BadJob, encode_job, evaluation_task_id
from pilot.v1.jobs_pb2 import EvaluateCheckpointJob

EVALUATE_TASK = "pilot.evaluator.evaluate_checkpoint"
"""Celery task name of the evaluation job (the worker registers it under this name)."""
JOB_SCHEMA_VERSION = 1

# Publishing to a broker that is down is retried briefly, then raises (the caller decides).
_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


def check_job(job: EvaluateCheckpointJob) -> EvaluateCheckpointJob:
    """Raise :class:`BadJob` naming the field when a job cannot be evaluated."""
    try:
        keys.check_run_id(job.run_id)
    except ConfigError as exc:
        raise BadJob(f"evaluation job: {exc}") from None
    if not job.uri:
        raise BadJob(f"evaluation job for run {job.run_id!r} round {job.round}: no checkpoint uri")
    if job.schema_version > JOB_SCHEMA_VERSION:
        raise BadJob(f"evaluation job schema v{job.schema_version} is newer than this code (v{JOB_SCHEMA_VERSION})")
    return job


def enqueue_evaluation(app: Celery, job: EvaluateCheckpointJob, *, queue: str = EVAL_QUEUE) -> str:
    """Put ``job`` on the evaluation queue; returns its task id (``eval:<run>:<round>``).

    Raises :class:`BadJob` for a job that cannot be evaluated and
    :class:`~pilot.errors.RetryableError` when the broker cannot be reached.
    """
    from kombu.exceptions import OperationalError

    check_job(job)
    payload = EvaluateCheckpointJob()
    payload.CopyFrom(job)
    payload.schema_version = payload.schema_version or JOB_SCHEMA_VERSION
    task_id = evaluation_task_id(payload.run_id, payload.round)
    try:
        app.send_task(
            EVALUATE_TASK, args=[encode_job(payload)], task_id=task_id, queue=queue,
            retry=True, retry_policy=_PUBLISH_RETRY,
        )
    except OperationalError as exc:
        raise RetryableError(
            f"cannot enqueue evaluation {task_id} on queue {queue!r}: broker unreachable: {exc}"
        ) from exc
    return task_id
