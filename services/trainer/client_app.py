"""The trainer's Flower ClientApp: a TRAIN message in, an encoded pseudo-gradient out.

Flower 1.41 starts a fresh ClientApp process for every message, so everything
that must outlive one round lives in the trainer's work dir (see
``local_round``). The node's identity and overrides come from its
``--node-config``: ``trainer-id`` (default ``node-<id>``), ``work-dir``,
``data-path`` (this node's own data), ``device``, ``num-devices`` (DDP ranks), and
Flower's ``partition-id`` / ``num-partitions``.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pilot.federated import to_records
from pilot.log import bind_run, configure
from pilot.protocol import ORDER, REPORT, TRAINER, UPDATE, UPDATE_META, WEIGHTS, RoundOrder
from services.trainer.local_round import TrainerIdentity, default_work_dir, run_local_round

app = ClientApp()


def trainer_identity(context: Context, run_id: str) -> TrainerIdentity:
    node_config = context.node_config
    trainer_id = str(node_config.get("trainer-id") or f"node-{context.node_id}")
    work_dir = node_config.get("work-dir")
    data_path = node_config.get("data-path")
    device = node_config.get("device")
    partition_id, num_partitions = node_config.get("partition-id"), node_config.get("num-partitions")
    return TrainerIdentity(
        trainer_id=trainer_id,
        node_id=int(context.node_id),
        work_dir=Path(str(work_dir)) if work_dir else default_work_dir(run_id, trainer_id),
        data_path=Path(str(data_path)) if data_path else None,
        device=str(device) if device else None,
        partition_id=int(partition_id) if partition_id is not None else None,
        num_partitions=int(num_partitions) if num_partitions is not None else None,
        num_devices=int(node_config.get("num-devices", 1)),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    received_at = time.monotonic()
    configure(service="trainer")
    order = RoundOrder.from_record(msg.content.config_records[ORDER])
    run_id = str(order.run_config.get("run-id", "pilot"))
    who = trainer_identity(context, run_id)
    bind_run(run_id=run_id, round=order.round, trainer_id=who.trainer_id)
    global_state = msg.content.array_records[WEIGHTS].to_torch_state_dict()
    result = run_local_round(order, global_state, who, received_at=received_at)
    arrays, meta = to_records(result.encoded)
    metrics, identity = result.report.to_records(who.trainer_id, who.node_id)
    content = RecordDict({UPDATE: arrays, UPDATE_META: meta, REPORT: metrics, TRAINER: identity})
    return Message(content=content, reply_to=msg)
