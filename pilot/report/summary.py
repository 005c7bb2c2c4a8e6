"""What a run did, distilled from its event log (and stored evaluation results) for the report.

:func:`summarize` reads event-log records (``pilot.eventlog`` format) and,
optionally, evaluation results as stored by the evaluator (JSON objects with
``round``, ``status``, ``bpb``, ``tokens``, ``sampled``, ``sample``, ``reason``...),
and returns a :class:`RunSummary`: one :class:`RoundRow` per round seen, each
trainer's progress points, and one :class:`EvalPoint` per evaluated round.

Sources per field: round tokens, trainers, mean loss and wall seconds from
``RoundClosed``; cumulative tokens from ``CheckpointPublished`` (else a running
sum); per-trainer tokens and training seconds from the last ``TrainerProgress``
of each trainer in the round; BPB, val loss and the sample from ``EvalCompleted`` or a
stored result (a stored result wins: it also says whether the split was
sampled). Events are delivered at least once, so a repeated event replaces the
earlier copy. Nothing here needs every piece: absent data stays ``None``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

EVAL_OK = "ok"
EVAL_FAILED = "failed"


def _int(value: Any) -> int:
    """MessageToDict writes 64-bit integers as strings and leaves zeros out."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float:
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


@dataclass
class EvalPoint:
    """One round's evaluation."""

    round: int
    status: str  # "ok" | "failed"
    bpb: float | None
    val_tokens: int
    sampled: bool | None  # None: not known (the event does not carry it)
    sample: str
    reason: str
    eval_s: float
    prompt: str = ""  # the sample's prompt, when known
    loss: float | None = None  # mean nats per validation token (older evaluations: unknown)

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.loss) if self.loss is not None and self.loss < 700 else None

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> EvalPoint:
        ok = event.get("status") == "EVAL_STATUS_OK"
        return cls(
            round=_int(event.get("round")), status=EVAL_OK if ok else EVAL_FAILED,
            bpb=_float(event.get("bpb")) if ok else None, val_tokens=_int(event.get("tokens")), sampled=None,
            sample=str(event.get("sample", "")), reason=str(event.get("failed_reason", "")),
            eval_s=_float(event.get("eval_s")),
            loss=_float(event.get("val_loss")) if ok and "val_loss" in event else None,
        )

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> EvalPoint:
        ok = result.get("status") == EVAL_OK
        bpb = result.get("bpb")
        return cls(
            round=_int(result.get("round")), status=EVAL_OK if ok else EVAL_FAILED,
            bpb=_float(bpb) if ok and bpb is not None else None, val_tokens=_int(result.get("tokens")),
            sampled=result.get("sampled"), sample=str(result.get("sample", "")), reason=str(result.get("reason", "")),
            eval_s=_float(result.get("eval_s")), prompt=str(result.get("prompt", "")),
            loss=_float(result.get("loss")) if ok and result.get("loss") is not None else None,
        )


@dataclass
class ProgressPoint:
    """One TrainerProgress."""

    trainer: str
    round: int
    step: int
    tokens: int  # this round so far
    loss: float
    elapsed_s: float
    tokens_per_s: float


@dataclass
class RoundRow:
    """Everything known about one round."""

    round: int
    started: bool = False
    closed: bool = False
    tokens: int | None = None  # trained this round, valid updates only (RoundClosed)
    total_tokens: int | None = None  # cumulative, up to this round's checkpoint
    trainers: list[str] = field(default_factory=list)
    valid_updates: int = 0
    rejected_updates: int = 0
    mean_loss: float | None = None
    wall_s: float | None = None  # coordinator's round length
    tokens_by_trainer: dict[str, int] = field(default_factory=dict)  # last progress per trainer
    train_s_by_trainer: dict[str, float] = field(default_factory=dict)
    loss_by_trainer: dict[str, tuple[int, float]] = field(default_factory=dict)  # latest (step, loss)
    eval: EvalPoint | None = None

    @property
    def loss(self) -> float | None:
        """RoundClosed's mean training loss, else the token-weighted mean of each trainer's latest loss."""
        if self.mean_loss is not None:
            return self.mean_loss
        if not self.loss_by_trainer:
            return None
        weights = {t: max(1, self.tokens_by_trainer.get(t, 0)) for t in self.loss_by_trainer}
        total = sum(weights.values())
        return sum(weights[t] * loss for t, (_, loss) in self.loss_by_trainer.items()) / total

    @property
    def train_s(self) -> float | None:
        """The longest trainer's training time this round."""
        return max(self.train_s_by_trainer.values()) if self.train_s_by_trainer else None

    @property
    def overhead_s(self) -> float | None:
        """Round wall time not spent training (start-up, upload, aggregation, checkpoint)."""
        if self.wall_s is None or self.train_s is None:
            return None
        return max(0.0, self.wall_s - self.train_s)


@dataclass
class RunSummary:
    run_id: str | None = None
    model: str = ""
    strategy: str = ""
    task: str = ""  # the run config's task (pretrain | shakespeare), from RunStarted
    planned_rounds: int = 0
    resumed_from_round: int = 0
    stopped: dict[str, Any] | None = None  # RunStopped fields
    rounds: dict[int, RoundRow] = field(default_factory=dict)
    progress: dict[str, list[ProgressPoint]] = field(default_factory=dict)
    rejected: list[tuple[str, int, str]] = field(default_factory=list)  # trainer, round, reason
    events: int = 0
    undecodable: int = 0

    def row(self, round: int) -> RoundRow:
        return self.rounds.setdefault(round, RoundRow(round))

    @property
    def ordered_rounds(self) -> list[RoundRow]:
        return [self.rounds[r] for r in sorted(self.rounds)]

    @property
    def evals(self) -> list[EvalPoint]:
        return [row.eval for row in self.ordered_rounds if row.eval is not None]

    @property
    def latest_ok_eval(self) -> EvalPoint | None:
        ok = [e for e in self.evals if e.status == EVAL_OK]
        return ok[-1] if ok else None

    @property
    def trainers(self) -> list[str]:
        names = set(self.progress)
        for row in self.rounds.values():
            names.update(row.trainers)
        return sorted(names)


def _apply(summary: RunSummary, kind: str, event: Mapping[str, Any]) -> None:
    round = _int(event.get("round"))
    if kind == "RunStarted":
        summary.model = str(event.get("model", summary.model))
        summary.strategy = str(event.get("strategy", summary.strategy))
        summary.planned_rounds = _int(event.get("num_rounds"))
        summary.resumed_from_round = _int(event.get("resumed_from_round"))
        try:
            summary.task = str(json.loads(str(event.get("config_json") or "{}")).get("task", ""))
        except (ValueError, AttributeError):
            pass
    elif kind == "RoundStarted":
        summary.row(round).started = True
    elif kind == "RoundClosed":
        row = summary.row(round)
        row.closed = True
        row.tokens = _int(event.get("tokens"))
        row.trainers = [str(t) for t in event.get("trainers", [])]
        row.valid_updates = _int(event.get("valid_updates"))
        row.rejected_updates = _int(event.get("rejected_updates"))
        row.mean_loss = _float(event.get("mean_loss")) if "mean_loss" in event else None
        row.wall_s = _float(event.get("wall_s"))
    elif kind == "CheckpointPublished":
        summary.row(round).total_tokens = _int(event.get("tokens"))
    elif kind == "EvalCompleted":
        point = EvalPoint.from_event(event)
        row = summary.row(point.round)
        if row.eval is None or row.eval.status != EVAL_OK:  # an OK result is final
            row.eval = point
    elif kind == "TrainerProgress":
        point = ProgressPoint(
            trainer=str(event.get("trainer_id", "?")), round=round, step=_int(event.get("step")),
            tokens=_int(event.get("tokens")), loss=_float(event.get("loss")),
            elapsed_s=_float(event.get("elapsed_s")), tokens_per_s=_float(event.get("tokens_per_s")),
        )
        summary.progress.setdefault(point.trainer, []).append(point)
        row = summary.row(round)
        row.tokens_by_trainer[point.trainer] = max(point.tokens, row.tokens_by_trainer.get(point.trainer, 0))
        row.train_s_by_trainer[point.trainer] = max(point.elapsed_s, row.train_s_by_trainer.get(point.trainer, 0.0))
        if point.step >= row.loss_by_trainer.get(point.trainer, (-1, 0.0))[0]:
            row.loss_by_trainer[point.trainer] = (point.step, point.loss)
    elif kind == "UpdateRejected":
        summary.rejected.append((str(event.get("trainer_id", "?")), round, str(event.get("reason", ""))))
    elif kind == "RunStopped":
        summary.stopped = dict(event)


def summarize(records: Iterable[Mapping[str, Any]], eval_results: Iterable[Mapping[str, Any]] = ()) -> RunSummary:
    """A :class:`RunSummary` from event-log records and stored evaluation results."""
    summary = RunSummary()
    for record in records:
        summary.events += 1
        event = record.get("event")
        if not isinstance(event, Mapping):
            summary.undecodable += 1
            continue
        if summary.run_id is None and event.get("run_id"):
            summary.run_id = str(event["run_id"])
        _apply(summary, str(record.get("type", "")), event)
    for result in eval_results:
        point = EvalPoint.from_result(result)
        row = summary.row(point.round)
        if row.eval is None or point.status == EVAL_OK or row.eval.status != EVAL_OK:
            row.eval = point
        if row.total_tokens is None and "checkpoint_tokens" in result:
            row.total_tokens = _int(result.get("checkpoint_tokens"))
    for trainer_points in summary.progress.values():
        trainer_points.sort(key=lambda p: (p.round, p.step, p.elapsed_s))
    running = 0
    for row in summary.ordered_rounds:  # cumulative tokens where no checkpoint said
        running = row.total_tokens if row.total_tokens is not None else running + (row.tokens or 0)
        if row.total_tokens is None and row.tokens is not None:
            row.total_tokens = running
    return summary
