"""The coordinator's round loop: start, watch, close, aggregate, checkpoint, hand off evaluation.

One :class:`RoundController` drives a run through Flower's Grid:

1. wait until ``min-trainers`` nodes are connected;
2. publish ``RoundStarted`` (its stream id goes into every order, so trainers
   replay stops from there) and push one TRAIN message per trainer with W_r;
3. pull replies until all are in or the deadline passes (budget + grace),
   publishing ``StopRound`` when asked (gRPC / ``pilot round stop``) or when the
   availability policy says a trainer that joined should not wait a whole round;
4. decode and validate each reply — a bad one is rejected with an
   ``UpdateRejected`` event naming the trainer and the reason, and the round
   goes on with the rest; a late reply (after the round closed) is dropped;
5. average the valid Δs weighted by tokens, apply the outer optimiser (a round
   with no valid reply keeps the weights), write the round checkpoint, publish
   ``RoundClosed`` and ``CheckpointPublished``, and enqueue the evaluation job
   — never waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pilot.bus import Bus
from pilot.errors import BadUpdate, PilotError
from pilot.federated import (
    DeltaAccumulator,
    UpdateCodec,
    UpdateLimits,
    from_records,
    global_norm,
    validate_metrics,
    validate_update,
)
from pilot.log import bind_run, get_logger
from pilot.protocol import ORDER, REPORT, TRAINER, UPDATE, UPDATE_META, WEIGHTS, RoundOrder, TrainerReport
from pilot.run_config import RunConfig
from pilot.v1 import events_pb2 as ev
from pilot.v1 import services_pb2 as svc
from services.coordinator.control import RunControl
from services.coordinator.state import RunAssets, RunState, save_round

log = get_logger(__name__)

POLL_S = 0.2


@dataclass
class RoundOutcome:
    round: int
    accepted: dict[str, TrainerReport] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # trainer or node -> reason
    missing: list[int] = field(default_factory=list)  # nodes that did not reply in time
    empty: list[str] = field(default_factory=list)  # trainers stopped before their first step
    wall_s: float = 0.0
    stop_reason: str = ""


class NoTrainers(PilotError):
    """min-trainers did not connect within trainer-wait-s."""


class RoundController:
    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        assets: RunAssets,
        state: RunState,
        bus: Bus,
        control: RunControl,
        on_checkpoint: Callable[[int, str, str, int], None],
    ) -> None:
        self.grid, self.cfg, self.assets, self.state = grid, cfg, assets, state
        self.bus, self.control, self.on_checkpoint = bus, control, on_checkpoint
        self.shapes = {k: tuple(v.shape) for k, v in state.weights.items()}
        self.codec = UpdateCodec(cfg.update_dtype, (cfg.int8_block or None) if cfg.update_dtype == "int8" else None)
        self.limits = UpdateLimits(max_norm=cfg.max_update_norm)

    # --- trainers ------------------------------------------------------------------
    def wait_for_trainers(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.trainer_wait_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_trainers:
                return nodes
            if self.control.stop_run_requested:
                return []
            if time.monotonic() > deadline:
                raise NoTrainers(f"only {len(nodes)} of min-trainers={self.cfg.min_trainers} trainers connected "
                                 f"within trainer-wait-s={self.cfg.trainer_wait_s:g}")
            time.sleep(1.0)

    # --- one round -------------------------------------------------------------------
    def run_round(self, round: int) -> RoundOutcome:
        bind_run(round=round)
        nodes = self.wait_for_trainers()
        if not nodes:
            return RoundOutcome(round=round, stop_reason="run stopped before the round started")
        started = time.monotonic()
        since_id = self.bus.publish(ev.RoundStarted(
            round=round, duration_s=self.cfg.round_seconds, round_steps=self.cfg.round_steps,
            participants=[str(n) for n in nodes], reply_timeout_s=self.cfg.reply_grace_s,
        ))
        self.control.update(state=svc.RUN_STATE_TRAINING, round=round, participants=[str(n) for n in nodes],
                            round_started_at=started)
        order = RoundOrder(
            round=round, seconds=self.cfg.round_seconds, steps=self.cfg.round_steps, since_id=since_id,
            tokenizer_sha256=self.assets.tokenizer.sha256, run_config=self.cfg.as_run_config(),
        )
        weights = ArrayRecord(self.state.weights)
        budget = self.cfg.round_seconds if not self.cfg.round_steps else self.cfg.step_round_timeout_s
        # a TRAIN message that no trainer picked up before the round's deadline expires unseen, so a
        # busy or restarted node never trains a stale round after the fact
        ttl = budget + self.cfg.reply_grace_s
        messages = [
            Message(content=RecordDict({WEIGHTS: weights, ORDER: order.to_record()}), dst_node_id=node,
                    message_type=MessageType.TRAIN, group_id=f"{self.cfg.run_id}:{round}", ttl=ttl)
            for node in nodes
        ]
        pending = {mid: node for mid, node in zip(self.grid.push_messages(messages), nodes)}
        log.info("round started", nodes=nodes, seconds=self.cfg.round_seconds, steps=self.cfg.round_steps)
        outcome = RoundOutcome(round=round)
        replies: list[Message] = []
        deadline = started + ttl
        stop_sent = False
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                pending.pop(reply.metadata.reply_to_message_id, None)
                replies.append(reply)
            if not stop_sent:
                reason = self._stop_reason(round, nodes)
                if reason:
                    self.bus.publish(ev.StopRound(round=round, reason=reason[0], detail=reason[1],
                                                  requested_by="coordinator"))
                    outcome.stop_reason, stop_sent = ev.StopReason.Name(reason[0]), True
                    log.info("round stop published", reason=outcome.stop_reason, detail=reason[1])
            if pending:
                time.sleep(POLL_S)
        outcome.missing = sorted(pending.values())
        self.control.update(state=svc.RUN_STATE_AGGREGATING)
        self._aggregate(round, replies, outcome)
        outcome.wall_s = time.monotonic() - started
        return outcome

    def _stop_reason(self, round: int, nodes: list[int]) -> tuple[int, str] | None:
        detail = self.control.take_stop_round(round)
        if detail is not None:
            return ev.STOP_REASON_OPERATOR, detail
        if self.control.stop_run_requested:
            return ev.STOP_REASON_RUN_STOPPING, self.control.stop_run_requested
        if self.cfg.early_start_policy == "joiners" and not self.cfg.round_steps:
            joined = sorted(set(self.grid.get_node_ids()) - set(nodes))
            if joined:
                return ev.STOP_REASON_AVAILABILITY, f"nodes {joined} joined; closing the round so they need not wait"
        return None

    # --- closing a round -------------------------------------------------------------
    def _reject(self, round: int, trainer: str, reason: str, outcome: RoundOutcome) -> None:
        outcome.rejected[trainer] = reason
        self.bus.publish(ev.UpdateRejected(trainer_id=trainer, round=round, reason=reason))
        log.warning("update rejected", trainer=trainer, reason=reason)

    def _aggregate(self, round: int, replies: list[Message], outcome: RoundOutcome) -> None:
        accumulator = DeltaAccumulator()
        weights_norm = global_norm(self.state.weights)
        for reply in replies:
            node = f"node-{reply.metadata.src_node_id}"
            if reply.has_error():
                self._reject(round, node, f"trainer failed: {reply.error.reason}", outcome)
                continue
            try:
                content = reply.content
                trainer, report = TrainerReport.from_records(content.metric_records[REPORT],
                                                             content.config_records[TRAINER])
                node = trainer
                if report.steps == 0:  # stopped before training: nothing to aggregate, nothing wrong
                    outcome.empty.append(trainer)
                    continue
                encoded = from_records(content.array_records[UPDATE], content.config_records[UPDATE_META])
                delta = self.codec.decode(encoded)
                validate_update(delta, self.shapes, self.limits, weights_norm=weights_norm)
                tokens = validate_metrics({"tokens": report.tokens, "mean_loss": report.mean_loss,
                                           "train_seconds": report.train_seconds})
                accumulator.add(delta, tokens)
                outcome.accepted[trainer] = report
            except (BadUpdate, KeyError) as exc:
                self._reject(round, node, str(exc) if isinstance(exc, BadUpdate) else f"reply lacks {exc}", outcome)
        mean = accumulator.mean()
        if mean is not None:
            self.state.weights = self.state.outer.step(self.state.weights, mean)
            self.state.tokens += accumulator.total_tokens
        else:
            log.warning("no valid reply: keeping the previous weights")
        self.state.round = round
        reports = outcome.accepted.values()
        mean_loss = sum(r.mean_loss * r.tokens for r in reports) / max(sum(r.tokens for r in reports), 1)
        path, sha256 = save_round(self.cfg, self.assets, self.state, extra={
            "trainers": sorted(outcome.accepted), "rejected": outcome.rejected, "mean_train_loss": mean_loss,
            "reports": {name: asdict(report) for name, report in outcome.accepted.items()},
            "wall_s": time.monotonic() - (self.control.snapshot().round_started_at or time.monotonic()),
        })
        self.bus.publish(ev.RoundClosed(
            round=round, trainers=sorted(outcome.accepted),
            tokens=accumulator.total_tokens, valid_updates=len(outcome.accepted),
            rejected_updates=len(outcome.rejected),
            wall_s=time.monotonic() - (self.control.snapshot().round_started_at or time.monotonic()),
            mean_loss=mean_loss, weights_changed=mean is not None,
        ))
        self.bus.publish(ev.CheckpointPublished(round=round, uri=str(path), sha256=sha256,
                                                tokens=self.state.tokens, size_bytes=checkpoint_bytes(path)))
        self.control.update(tokens_total=self.state.tokens, last_checkpoint_uri=str(path))
        self.on_checkpoint(round, str(path), sha256, self.state.tokens)
        log.info("round closed", accepted=sorted(outcome.accepted), rejected=outcome.rejected,
                 missing=outcome.missing, empty=outcome.empty, tokens=accumulator.total_tokens, mean_loss=round_or_nan(mean_loss))


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def round_or_nan(value: float) -> float:
    return round(value, 4) if value == value else value
