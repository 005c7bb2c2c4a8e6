"""The trainer's Flower ClientApp: a TRAIN message in, an encoded pseudo-gradient out (imports no torch).

Flower 1.41 starts a fresh ClientApp process for every message, and torch, Pilot's
trainer modules and the first optimiser cost ~20 s of CPU to load on a 2-core box. So
by default this app is thin: it hands each round to the node's long-lived trainer
host (``host.py``, started on first use and reused while it serves the same run, work
dir and code), passing W_r and the update as safetensors files in the work dir, and
turns the host's reply into Flower records. A host that dies or fails mid-round makes
this app raise, which Flower delivers as an error reply; the next message starts a
fresh host. Everything that must outlive a host lives in the work dir (see
``local_round``).

Node config (``--node-config``):
- ``trainer-id`` (default ``node-<id>``), ``work-dir``, ``data-path`` (this node's own
  data), ``device``, ``num-devices`` (DDP ranks), Flower's ``partition-id`` /
  ``num-partitions`` (see ``identity.py``);
- ``trainer-host``: ``auto`` (default: a host where Flower starts a process per message,
  i.e. ``flwr-clientapp`` in a deployment; in-process where the ClientApp process lives
  on, as in the simulation engine's Ray workers), ``on`` (always a host), ``off``
  (always in-process: the round runs in this process, as before the host existed);
- ``trainer-host-idle-s`` (default 900): the host exits after this long without a round;
- ``trainer-host-start-s`` (default 180): how long to wait for a new host to serve.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pilot.log import bind_run, configure, get_logger
from pilot.protocol import ORDER, REPORT, TRAINER, UPDATE, UPDATE_META, WEIGHTS, RoundOrder, TrainerReport
from services.trainer.host_client import (
    HostSettings,
    HostSpec,
    ensure_host,
    exchange_dir,
    read_arrays,
    round_request,
    watch_pid,
    write_arrays,
)
from services.trainer.identity import TrainerIdentity, identity_from_node_config

log = get_logger(__name__)
app = ClientApp()


def trainer_identity(context: Context, run_id: str) -> TrainerIdentity:
    return identity_from_node_config(context.node_config, int(context.node_id), run_id)


def update_records(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> tuple[ArrayRecord, ConfigRecord]:
    """The reply's ``update`` and ``update-meta`` records from the encoded update's arrays and metadata."""
    return ArrayRecord({key: Array(value) for key, value in arrays.items()}), ConfigRecord(dict(metadata))


def _train_in_process(msg: Message, order: RoundOrder, who: TrainerIdentity, received_at: float) -> tuple:
    from services.trainer.ddp import train_round  # imports torch

    global_state = msg.content.array_records[WEIGHTS].to_torch_state_dict()
    result = train_round(order, global_state, who, received_at=received_at)
    records, report = update_records(result.encoded.to_arrays(), result.encoded.metadata()), result.report
    del global_state, result
    _release_accelerator_memory()
    return records, report, {}


def _release_accelerator_memory() -> None:
    """Hand the round's cached GPU memory back: in-process ClientApps live on (simulation's Ray workers),
    and several simulated clients may share one GPU (fractional ``client-resources-num-gpus``)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_on_host(msg: Message, order: RoundOrder, who: TrainerIdentity, settings: HostSettings,
                   received_at: float) -> tuple:
    run_id = str(order.run_config.get("run-id", "pilot"))
    host = ensure_host(HostSpec(run_id=run_id, work_dir=who.work_dir, settings=settings, watch_pid=watch_pid()))
    host_ready = time.monotonic()
    weights = {k: v.numpy() for k, v in msg.content.array_records[WEIGHTS].items()}
    weights_path = exchange_dir(who.work_dir) / f"weights-r{order.round:05d}-{uuid.uuid4().hex[:8]}.safetensors"
    update_path = None
    try:
        write_arrays(weights_path, weights)
        del weights
        ttl = float(msg.metadata.ttl or 0.0)  # a reply after the TTL is useless: the host gives up with us
        request = round_request(order, who, weights_path, elapsed_s=time.monotonic() - received_at)
        reply = host.run_round(request, timeout_s=ttl if ttl > 0 else None)
        update_path = reply.update_path
        records = update_records(read_arrays(update_path), json.loads(reply.update_metadata_json))
    finally:
        host.close()
        weights_path.unlink(missing_ok=True)
        if update_path:
            Path(update_path).unlink(missing_ok=True)
    log.info("round trained on the trainer host", host_pid=host.pid, host_started=host.started,
             host_ready_s=round(host_ready - received_at, 3), round_trip_s=round(time.monotonic() - host_ready, 3),
             process_age_at_call_s=round(time.time() - psutil.Process().create_time()
                                         - (time.monotonic() - received_at), 3))
    report = TrainerReport(tokens=reply.tokens, steps=reply.steps, mean_loss=reply.mean_loss,
                           train_seconds=reply.train_seconds, setup_seconds=reply.setup_seconds,
                           units_completed=reply.units_completed, stopped_by=reply.stopped_by)
    return records, report, {"host-pid": int(reply.host_pid), "host-rounds": int(reply.rounds_served)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    received_at = time.monotonic()
    configure(service="trainer")
    order = RoundOrder.from_record(msg.content.config_records[ORDER])
    run_id = str(order.run_config.get("run-id", "pilot"))
    who = trainer_identity(context, run_id)
    bind_run(run_id=run_id, round=order.round, trainer_id=who.trainer_id)
    settings = HostSettings.from_node_config(context.node_config)
    if settings.use_host():
        (arrays, meta), report, extra = _train_on_host(msg, order, who, settings, received_at)
    else:
        (arrays, meta), report, extra = _train_in_process(msg, order, who, received_at)
    metrics, identity = report.to_records(who.trainer_id, who.node_id)
    identity.update(extra)  # which host trained it (the coordinator reads only its own keys)
    content = RecordDict({UPDATE: arrays, UPDATE_META: meta, REPORT: metrics, TRAINER: identity})
    return Message(content=content, reply_to=msg)
