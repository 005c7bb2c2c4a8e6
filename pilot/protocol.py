"""The round's Flower messages between coordinator and trainers: record names and typed views.

A TRAIN message from the coordinator holds:

- ``weights`` (ArrayRecord): the global weights W_r, fp32, in ``state_dict`` order;
- ``order`` (ConfigRecord): a :class:`RoundOrder` — round number, time or step
  budget, the control-stream id of the round's ``RoundStarted`` (trainers replay
  from there, so a stop published before they looked is still seen), the
  tokenizer's sha256 and the whole run config as JSON (trainers never parse
  configuration on their own).

The trainer's reply holds:

- ``update`` (ArrayRecord) + ``update-meta`` (ConfigRecord): the encoded
  pseudo-gradient (``pilot.federated.to_records``);
- ``report`` (MetricRecord) + ``trainer`` (ConfigRecord): a :class:`TrainerReport`.

Both sides import these names from here, so the contract lives in one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, MetricRecord

from pilot.errors import BadUpdate

WEIGHTS = "weights"
ORDER = "order"
UPDATE = "update"
UPDATE_META = "update-meta"
REPORT = "report"
TRAINER = "trainer"


@dataclass(frozen=True)
class RoundOrder:
    round: int  # 1-based round number
    seconds: float  # training budget on the trainer's own monotonic clock
    steps: int  # > 0: stop after this many inner steps instead of by time
    since_id: str  # control-stream id of this round's RoundStarted
    tokenizer_sha256: str  # the run's tokenizer; trainers refuse another one
    run_config: dict[str, Any]  # RunConfig.as_run_config()

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "round": self.round,
            "seconds": float(self.seconds),
            "steps": self.steps,
            "since-id": self.since_id,
            "tokenizer-sha256": self.tokenizer_sha256,
            "run-config": json.dumps(self.run_config, sort_keys=True),
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundOrder:
        try:
            return cls(
                round=int(record["round"]),
                seconds=float(record["seconds"]),
                steps=int(record["steps"]),
                since_id=str(record["since-id"]),
                tokenizer_sha256=str(record["tokenizer-sha256"]),
                run_config=json.loads(str(record["run-config"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed round order: {exc!r}") from None


@dataclass(frozen=True)
class TrainerReport:
    tokens: int  # targets trained on this round
    steps: int  # inner optimiser steps
    mean_loss: float  # mean training loss over the round's steps
    train_seconds: float  # seconds spent in the training loop
    setup_seconds: float  # seconds from message receipt to the first step (load, lease, data)
    units_completed: int  # work units finished this round
    stopped_by: str  # "time" | "steps" | "stop" | "data"

    def to_records(self, trainer_id: str, node_id: int) -> tuple[MetricRecord, ConfigRecord]:
        metrics = MetricRecord({k: v for k, v in asdict(self).items() if k != "stopped_by"})
        identity = ConfigRecord({"trainer-id": trainer_id, "node-id": int(node_id), "stopped-by": self.stopped_by})
        return metrics, identity

    @classmethod
    def from_records(cls, metrics: MetricRecord, identity: ConfigRecord) -> tuple[str, TrainerReport]:
        try:
            values = {f.name: metrics[f.name] for f in fields(cls) if f.name != "stopped_by"}
            report = cls(
                tokens=int(values["tokens"]),
                steps=int(values["steps"]),
                mean_loss=float(values["mean_loss"]),
                train_seconds=float(values["train_seconds"]),
                setup_seconds=float(values["setup_seconds"]),
                units_completed=int(values["units_completed"]),
                stopped_by=str(identity["stopped-by"]),
            )
            return str(identity["trainer-id"]), report
        except (KeyError, TypeError, ValueError) as exc:
            raise BadUpdate(f"malformed trainer report: {exc!r}") from None
