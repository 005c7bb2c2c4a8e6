"""Evaluation results of a run in Redis: stored once per round, published with the result.

A result is one JSON object per (run, round) (:class:`EvalResult`): status
``ok``/``failed``, BPB, validation loss (mean nats per scored token), validation tokens scored and whether they were a sample
of the split or all of it, the text sample, the checkpoint's sha256, seconds,
and the reason when it failed. Keys (``pilot/keys.py``):

- ``pilot:<run>:eval:results``  round -> JSON of the successful evaluation;
- ``pilot:<run>:eval:failed``   round -> JSON of the latest failed one (deleted
  when the round later succeeds, e.g. after its tokenizer was restored).

:meth:`ResultStore.record` runs one Lua script that stores the result *and*
appends its ``EvalCompleted`` to the run's control stream, atomically: a round
that already has a successful result is left alone (the stored one is
returned), so however often a job is delivered, retried or duplicated there is
one result and one ``EvalCompleted{status: OK}`` per round, and a worker that
dies between storing and publishing cannot exist. A failed evaluation does not
block a later attempt at the same round; each failed attempt publishes its
own ``EvalCompleted{status: FAILED}`` with the reason.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import redis

from pilot import keys
from pilot.bus import RetryPolicy, encode
from pilot.bus.registry import as_text
from pilot.errors import PilotError
from pilot.keys import EvalKey, Stream
from pilot.v1 import events_pb2 as ev
from pilot.v1 import jobs_pb2

if TYPE_CHECKING:
    from services.evaluator.evaluation import EvalOutcome

Status = Literal["ok", "failed"]
RESULT_FORMAT = 1

# KEYS: results hash, failed hash, control stream. ARGV: round, result JSON, status, event fields (k, v, ...).
# Returns {1, entry id} when stored and published, {0, stored JSON} when the round already succeeded.
_RECORD_SCRIPT = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {0, existing} end
if ARGV[3] == 'ok' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local entry = {}
for i = 4, #ARGV do entry[#entry + 1] = ARGV[i] end
return {1, redis.call('XADD', KEYS[3], '*', unpack(entry))}
"""


class BadResult(PilotError):
    """A stored result that does not parse (written by another version, or edited by hand)."""


@dataclass(frozen=True)
class EvalResult:
    """The outcome of evaluating one round's checkpoint, as stored in Redis."""

    run_id: str
    round: int
    status: Status
    checkpoint_uri: str
    checkpoint_sha256: str  # of checkpoint.json: the one scored (ok) or the job's expectation (failed)
    checkpoint_tokens: int  # training tokens up to this checkpoint
    bpb: float | None = None
    loss: float | None = None  # mean cross-entropy per scored validation token, nats (perplexity = exp)
    tokens: int = 0  # validation targets scored
    split_tokens: int = 0  # targets in the whole validation split
    sampled: bool = False  # True: a seeded sample of the split; False: the whole split
    bytes: int = 0
    seq_len: int = 0
    sample: str = ""  # generated after the prompt
    prompt: str = ""
    eval_s: float = 0.0
    reason: str = ""  # why it failed
    device: str = ""
    attempts: int = 1  # deliveries of the job that led to this result
    finished_at: float = 0.0  # unix seconds
    format: int = RESULT_FORMAT

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def succeeded(cls, job: jobs_pb2.EvaluateCheckpointJob, outcome: EvalOutcome, *, attempts: int = 1) -> EvalResult:
        return cls(
            run_id=job.run_id, round=job.round, status="ok", checkpoint_uri=job.uri,
            checkpoint_sha256=outcome.checkpoint_sha256, checkpoint_tokens=job.tokens or outcome.tokens_seen,
            bpb=outcome.bpb, loss=outcome.loss_per_token, tokens=outcome.tokens, split_tokens=outcome.split_tokens, sampled=outcome.sampled,
            bytes=outcome.bytes, seq_len=outcome.seq_len, sample=outcome.sample, prompt=outcome.prompt,
            eval_s=outcome.eval_s,
            device=outcome.device, attempts=attempts, finished_at=time.time(),
        )

    @classmethod
    def failed(
        cls, job: jobs_pb2.EvaluateCheckpointJob, reason: str, *, eval_s: float = 0.0, attempts: int = 1
    ) -> EvalResult:
        return cls(
            run_id=job.run_id, round=job.round, status="failed", checkpoint_uri=job.uri,
            checkpoint_sha256=job.sha256, checkpoint_tokens=job.tokens, reason=reason, eval_s=eval_s,
            attempts=attempts, finished_at=time.time(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        body = self.to_dict()
        for name in ("bpb", "loss"):
            if body[name] is not None and not math.isfinite(body[name]):
                body[name] = str(body[name])  # "nan" / "inf": JSON has no such numbers
        return json.dumps(body, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "result") -> EvalResult:
        try:
            body = json.loads(text)
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in body.items() if k in known}
            for name in ("bpb", "loss"):
                if isinstance(values.get(name), str):
                    values[name] = float(values[name])
            return cls(**values)
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadResult(f"{source} is not a valid evaluation result: {exc}") from exc

    def to_event(self) -> ev.EvalCompleted:
        """The ``EvalCompleted`` that announces this result."""
        return ev.EvalCompleted(
            run_id=self.run_id,
            round=self.round,
            bpb=self.bpb if self.bpb is not None else 0.0,
            val_loss=self.loss if self.loss is not None else 0.0,
            tokens=self.tokens,
            sample=self.sample,
            status=ev.EVAL_STATUS_OK if self.ok else ev.EVAL_STATUS_FAILED,
            failed_reason=self.reason,
            checkpoint_sha256=self.checkpoint_sha256,
            eval_s=self.eval_s,
        )


class ResultStore:
    """The evaluation results of one run."""

    def __init__(self, client: redis.Redis, run_id: str, *, retry: RetryPolicy | None = None) -> None:
        self.client = client
        self.run_id = keys.check_run_id(run_id)
        self.retry = retry or RetryPolicy()
        self.results_key = keys.evaluation(run_id, EvalKey.RESULTS)
        self.failed_key = keys.evaluation(run_id, EvalKey.FAILED)
        self._record = client.register_script(_RECORD_SCRIPT)

    def _parse(self, raw: bytes | str, key: str, round: int | str) -> EvalResult:
        return EvalResult.from_json(raw, source=f"{key} round {as_text(round) if isinstance(round, bytes) else round}")

    def get(self, round: int) -> EvalResult | None:
        """The successful result of ``round``, or None."""
        raw = self.retry.call(
            self.client, "reading an evaluation result", lambda: self.client.hget(self.results_key, round)
        )
        return None if raw is None else self._parse(raw, self.results_key, round)

    def get_failed(self, round: int) -> EvalResult | None:
        """The latest failed result of ``round`` (None once it succeeded)."""
        raw = self.retry.call(
            self.client, "reading a failed evaluation", lambda: self.client.hget(self.failed_key, round)
        )
        return None if raw is None else self._parse(raw, self.failed_key, round)

    def all(self, from_round: int = 0) -> list[EvalResult]:
        """One result per round from ``from_round`` on (the successful one, else the latest failure), by round."""
        ok = self.retry.call(self.client, "reading evaluation results", lambda: self.client.hgetall(self.results_key))
        bad = self.retry.call(self.client, "reading failed evaluations", lambda: self.client.hgetall(self.failed_key))
        merged: dict[int, EvalResult] = {}
        for key, table in ((self.failed_key, bad), (self.results_key, ok)):  # successes override failures
            for round, raw in table.items():
                result = self._parse(raw, key, round)
                if result.round >= from_round:
                    merged[result.round] = result
        return [merged[r] for r in sorted(merged)]

    def wait(self, round: int, timeout_s: float, *, poll_s: float = 0.5) -> EvalResult | None:
        """The result of ``round`` once there is one (successful or failed), or None after ``timeout_s``.

        For callers that choose to wait (e.g. ``pilot run`` before its final report); the
        coordinator never does.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.get(round) or self.get_failed(round)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def record(self, result: EvalResult) -> tuple[EvalResult, str | None]:
        """Store ``result`` and publish its ``EvalCompleted`` atomically.

        Returns (the stored result, the event's entry id). When the round already
        has a successful result, nothing is written: that result is returned with
        entry id None.
        """
        if result.run_id != self.run_id:
            raise BadResult(f"result of run {result.run_id!r} recorded in run {self.run_id!r}")
        fields_ = encode(result.to_event(), self.run_id)
        argv: list[bytes | str | int] = [result.round, result.to_json(), result.status]
        for name, value in fields_.items():
            argv += [name, value]
        control = keys.stream(self.run_id, Stream.CONTROL)
        created, payload = self.retry.call(
            self.client,
            "recording an evaluation result",
            lambda: self._record(keys=[self.results_key, self.failed_key, control], args=argv),
        )
        if int(created) == 1:
            return result, as_text(payload)
        return self._parse(payload, self.results_key, result.round), None
