"""Enqueueing tokenizer training jobs: what ``pilot tokenizer submit`` (or any service) calls.

Like the evaluation queue (services/evaluator/queue.py), the submitting side
needs no worker code, only a Celery app on the Redis broker::

    from pilot.jobs import make_celery
    from pilot.bus import redis_client
    from services.tokenizer.queue import enqueue_training
    from pilot.v1.jobs_pb2 import TrainTokenizerJob

    app = make_celery("pilot.submit", redis_url)
    submission = enqueue_training(app, redis_client(redis_url), TrainTokenizerJob(
        input="/data/fineweb", vocab_size=65536, out="/models/tok65k"))
    JobStatusStore(client).wait(submission.job_id)       # optional

Identity and idempotency: a job's id is derived from (input, vocab_size,
max_chars, doc_cap, out) (:func:`tokenizer_job_id`), its Celery task id is
``tokenizer:<job id>``, and its status lives under that id
(services/tokenizer/status.py). Enqueueing a job that already succeeded does
nothing (``already_done``) unless ``force``; the worker also skips a delivery
whose artifact is already in place with the recorded sha256, so a duplicate or
redelivered message never trains twice.

What is checked here is only the job's shape (a schema version this code
knows, an input path); whether it can be trained (vocab size, corpus, UTF-8)
is the worker's to find out, and it records the reason.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import redis
from celery import Celery

from pilot.errors import RetryableError
from pilot.hashing import sha256_bytes
from pilot.jobs import TOKENIZER_QUEUE, BadJob, encode_job
from pilot.v1.jobs_pb2 import TrainTokenizerJob

from services.tokenizer.status import JobStatusStore

TRAIN_TASK = "pilot.tokenizer.train_tokenizer"
"""Celery task name of the training job (the worker registers it under this name)."""
TASK_ID_PREFIX = "tokenizer:"
JOB_SCHEMA_VERSION = 1
JOB_ID_CHARS = 32  # 128 bits of the identity digest

# Publishing to a broker that is down is retried briefly, then raises (the caller decides).
_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


class Submission(NamedTuple):
    """What :func:`enqueue_training` did: the job's id, and whether it had already succeeded."""

    job_id: str
    task_id: str
    already_done: bool


def check_job(job: TrainTokenizerJob) -> TrainTokenizerJob:
    """Raise :class:`BadJob` naming the field when a job is not even well formed."""
    if job.schema_version > JOB_SCHEMA_VERSION:
        raise BadJob(f"tokenizer job schema v{job.schema_version} is newer than this code (v{JOB_SCHEMA_VERSION})")
    if not job.input:
        raise BadJob("tokenizer job: no input (a text/parquet file or a directory of them)")
    return job


def tokenizer_job_id(job: TrainTokenizerJob) -> str:
    """The job's identity: a digest of (input, vocab_size, max_chars, doc_cap, out)."""
    identity = [job.input, job.vocab_size, job.max_chars, job.doc_cap, job.out]
    return sha256_bytes(json.dumps(identity, ensure_ascii=True).encode("ascii"))[:JOB_ID_CHARS]


def task_id_of(job_id: str) -> str:
    return f"{TASK_ID_PREFIX}{job_id}"


def enqueue_training(
    app: Celery,
    client: redis.Redis,
    job: TrainTokenizerJob,
    *,
    queue: str = TOKENIZER_QUEUE,
    force: bool = False,
) -> Submission:
    """Put ``job`` on the tokenizer queue (status ``queued``) unless it already succeeded.

    ``force`` trains again even so (e.g. the input files changed). Raises
    :class:`BadJob` for a malformed job and :class:`~pilot.errors.RetryableError`
    when Redis or the broker cannot be reached.
    """
    from kombu.exceptions import OperationalError

    check_job(job)
    payload = TrainTokenizerJob()
    payload.CopyFrom(job)
    payload.schema_version = payload.schema_version or JOB_SCHEMA_VERSION
    job_id = tokenizer_job_id(payload)
    task_id = task_id_of(job_id)
    store = JobStatusStore(client)
    existing = store.get(job_id)
    if existing is not None and existing.ok and not force:
        return Submission(job_id, task_id, already_done=True)
    store.queued(job_id, payload)
    try:
        app.send_task(
            TRAIN_TASK, args=[encode_job(payload)], task_id=task_id, queue=queue,
            retry=True, retry_policy=_PUBLISH_RETRY,
        )
    except OperationalError as exc:
        store.failed(job_id, f"not enqueued: broker unreachable: {exc}")
        raise RetryableError(f"cannot enqueue tokenizer job {job_id} on queue {queue!r}: {exc}") from exc
    return Submission(job_id, task_id, already_done=False)
