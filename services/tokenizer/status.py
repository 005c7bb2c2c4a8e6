"""The status of a tokenizer training job, kept in Redis while it runs and after.

One hash per job, ``pilot:tokenizer:job:<job id>`` (:func:`pilot.keys.tokenizer_job`):

- ``state``: ``queued`` (by the enqueue helper) -> ``running`` (the worker took it)
  -> ``ok`` or ``failed``;
- ``phase``, ``percent`` (0-100 within the phase), ``message``: progress published
  by the worker from :func:`pilot.bpe.train_bpe`'s progress callback
  (:class:`ProgressPublisher`, throttled, best effort);
- on ``ok``: ``sha256`` (the tokenizer's identity, what checkpoints record and
  ``load_tokenizer(expected_sha256=...)`` checks), ``artifact_sha256`` (the
  digest of the ``tokenizer.json`` bytes, what the gRPC service serves),
  ``vocab_size`` and ``out``; on ``failed``: ``reason``.

:class:`JobStatusStore` writes and reads these hashes and can wait for a job
to finish (what ``pilot tokenizer submit --wait`` shows as a progress bar).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis

from pilot import keys
from pilot.errors import RetryableError
from pilot.log import get_logger
from pilot.v1.jobs_pb2 import TrainTokenizerJob

log = get_logger(__name__)

QUEUED, RUNNING, OK, FAILED = "queued", "running", "ok", "failed"
FINAL_STATES = (OK, FAILED)


@dataclass(frozen=True)
class JobStatus:
    """What Redis holds about one job (every field has a default: a hash may lack any)."""

    job_id: str
    state: str = QUEUED
    phase: str = ""
    percent: float = 0.0
    message: str = ""
    reason: str = ""
    input: str = ""
    out: str = ""
    requested_vocab: int = 0
    vocab_size: int = 0
    sha256: str = ""
    artifact_sha256: str = ""
    elapsed_s: float = 0.0
    attempts: int = 0
    updated_at: float = 0.0  # the writer's unix time, for display only

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def ok(self) -> bool:
        return self.state == OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hash(cls, job_id: str, raw: Mapping[bytes, bytes]) -> JobStatus:
        values: dict[str, Any] = {"job_id": job_id}
        for f in fields(cls):
            if f.name == "job_id" or f.name.encode() not in raw:
                continue
            text = raw[f.name.encode()].decode("utf-8", errors="replace")
            kind = type(getattr(cls, f.name, ""))  # the field's default tells its type
            try:
                values[f.name] = kind(text) if kind in (int, float) else text
            except ValueError:
                continue  # a malformed field keeps its default
        return cls(**values)


class JobStatusStore:
    """Read and write the status hashes of tokenizer jobs."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def get(self, job_id: str) -> JobStatus | None:
        raw = self._call("reading", lambda: self.client.hgetall(keys.tokenizer_job(job_id)))
        return JobStatus.from_hash(job_id, raw) if raw else None

    def queued(self, job_id: str, job: TrainTokenizerJob) -> None:
        """A fresh status for a job about to be enqueued (any earlier attempt's fields are dropped)."""
        self._replace(job_id, state=QUEUED, **_job_fields(job))

    def running(self, job_id: str, job: TrainTokenizerJob, *, out: str, attempts: int) -> None:
        self._replace(job_id, state=RUNNING, phase="starting", **{**_job_fields(job), "out": out}, attempts=attempts)

    def progress(self, job_id: str, phase: str, percent: float, message: str) -> None:
        self._update(job_id, phase=phase, percent=round(percent, 2), message=message)

    def succeeded(
        self, job_id: str, *, sha256: str, artifact_sha256: str, vocab_size: int, out: str, elapsed_s: float
    ) -> None:
        self._update(
            job_id, state=OK, phase="done", percent=100, message=f"trained vocab {vocab_size}", reason="",
            sha256=sha256, artifact_sha256=artifact_sha256, vocab_size=vocab_size, out=out,
            elapsed_s=round(elapsed_s, 3),
        )

    def failed(self, job_id: str, reason: str, *, elapsed_s: float = 0.0) -> None:
        self._update(job_id, state=FAILED, phase="failed", message=reason, reason=reason,
                     elapsed_s=round(elapsed_s, 3))

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 0.2,
        on_update: Callable[[JobStatus], object] | None = None,
    ) -> JobStatus:
        """Poll until the job is ok or failed; ``on_update`` sees every status read.

        Raises :class:`~pilot.errors.RetryableError` after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.get(job_id)
            if status is not None and on_update is not None:
                on_update(status)
            if status is not None and status.done:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                state = status.state if status else "unknown"
                raise RetryableError(f"tokenizer job {job_id} still {state} after {timeout_s:g} s")
            time.sleep(poll_s)

    def _replace(self, job_id: str, **values: object) -> None:
        key = keys.tokenizer_job(job_id)
        mapping = _as_strings(values)

        def write() -> None:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.execute()

        self._call("writing", write)

    def _update(self, job_id: str, **values: object) -> None:
        key, mapping = keys.tokenizer_job(job_id), _as_strings(values)
        self._call("writing", lambda: self.client.hset(key, mapping=mapping))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RetryableError(f"Redis unreachable while {what} a tokenizer job status: {exc}") from exc


def _job_fields(job: TrainTokenizerJob) -> dict[str, object]:
    return {"input": job.input, "out": job.out, "requested_vocab": job.vocab_size}


def _as_strings(values: Mapping[str, object]) -> dict[str, str]:
    return {name: str(value) for name, value in {**values, "updated_at": round(time.time(), 3)}.items()}


class ProgressPublisher:
    """A :data:`pilot.bpe.ProgressCallback` that publishes to a job's status hash.

    Writes at most every ``min_interval_s`` within a phase (always on a new
    phase and at its end). Progress is best effort: a Redis error is logged
    once and never stops training.
    """

    def __init__(self, store: JobStatusStore, job_id: str, *, min_interval_s: float = 0.25) -> None:
        self.store, self.job_id, self.min_interval_s = store, job_id, min_interval_s
        self._last: tuple[str, float] = ("", 0.0)
        self._warned = False

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        last_phase, last_time = self._last
        at_end = total is not None and done >= total
        if phase == last_phase and not at_end and now - last_time < self.min_interval_s:
            return
        self._last = (phase, now)
        percent = min(100.0, 100.0 * done / total) if total else 0.0
        message = f"{phase}: {done:,}/{total:,}" if total else f"{phase}: {done:,}"
        try:
            self.store.progress(self.job_id, phase, percent, message)
        except RetryableError as exc:
            if not self._warned:
                log.warning("cannot publish tokenizer job progress", job_id=self.job_id, error=str(exc))
                self._warned = True
