"""One trainer's share of a round: lease data, train until the budget or a stop, return Δ and a report.

``run_local_round(order, global_state, who)`` is the trainer's whole job for one
TRAIN message, without any Flower types (``client_app.py`` adapts it):

1. Load W_r into the model; restore the inner optimiser state and the inner
   step from the work dir (or start fresh when ``keep-inner-optimizer=false``).
2. Lease work units from the run's ledger and train on their batches with the
   same ``train_step`` as ``pilot train``, until the trainer's own monotonic
   clock says the budget (minus the upload margin) is spent, the step budget is
   reached, a ``StopRound`` for this round appears on the control stream (read
   from the round's ``RoundStarted`` entry on, so an early stop is never
   missed), or no unit is left to lease.
3. Publish progress and heartbeats on the telemetry stream while training; keep
   every held lease renewed; at the end, ``complete`` the units trained to
   their end and ``release_partial`` the others at their token offset, so no
   data is skipped or trained twice within an epoch.
4. Δ = W_r − W_local, encoded as the run says (int8 error feedback residual kept
   in the work dir), plus a :class:`~pilot.protocol.TrainerReport`.

Work-dir state survives the per-message ClientApp process: ``inner/`` (a
checkpoint of the inner optimiser state and inner step) and
``residual.safetensors``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pilot import paths
from pilot.bus import Bus, redis_client
from pilot.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pilot.config import parse_config
from pilot.data import resolve_data
from pilot.errors import CheckpointError, TokenizerError
from pilot.federated import (
    EncodedUpdate,
    UpdateCodec,
    load_residual,
    pseudo_gradient,
    save_residual,
)
from pilot.ledger import Ledger
from pilot.log import get_logger
from pilot.model import build_model
from pilot.optim import (
    LRSchedule,
    apply_lr,
    build_optimizers,
    load_optimizer_state_tensors,
    optimizer_state_tensors,
)
from pilot.protocol import RoundOrder, TrainerReport
from pilot.run_config import RunConfig
from pilot.runtime import pick_device, resolve_dtype, seed_everything
from pilot.sources import resolve_named_source
from pilot.tokenizer import Tokenizer, load_tokenizer
from pilot.train import model_config_for, optim_config_from, train_step
from pilot.v1 import events_pb2 as ev
from services.trainer.feeds import HeldUnit, UnitFeed

log = get_logger(__name__)

INNER_STATE = "inner"  # work-dir checkpoint of the inner optimiser
RESIDUAL_FILE = "residual.safetensors"
NO_PLANNED_END = 10**12  # federated inner schedule: warmup, then constant


@dataclass(frozen=True)
class TrainerIdentity:
    trainer_id: str
    node_id: int
    work_dir: Path
    data_path: Path | None = None  # this node's own data (deployment partitions)
    device: str | None = None  # overrides the run's device on this node
    partition_id: int | None = None  # Flower's node-config partition-id: this node's slice of the data
    num_partitions: int | None = None  # Flower's node-config num-partitions
    num_devices: int = 1  # devices (DDP ranks) this trainer trains on


@dataclass
class LocalResult:
    encoded: EncodedUpdate
    report: TrainerReport
    units: list[HeldUnit] = field(default_factory=list)


def default_work_dir(run_id: str, trainer_id: str) -> Path:
    return paths.base_dir() / "trainers" / run_id / trainer_id


TOKENIZER_ADDR_ENV = "PILOT_TOKENIZER_ADDR"  # the tokenizer service, for trainers without the run dir


def load_run_tokenizer(cfg: RunConfig, expected_sha256: str, work_dir: Path) -> Tokenizer:
    """The run's tokenizer, checked against the coordinator's sha256.

    From the run dir when this machine shares it; otherwise fetched from the
    tokenizer service (``$PILOT_TOKENIZER_ADDR``) into the work dir's cache.
    """
    location = cfg.run_dir() / "tokenizer"
    if location.exists():
        return load_tokenizer(location, expected_sha256=expected_sha256)
    address = os.environ.get(TOKENIZER_ADDR_ENV)
    if not address:
        raise TokenizerError(
            f"the run's tokenizer is not at {location} and ${TOKENIZER_ADDR_ENV} names no tokenizer service"
        )
    from pilot.grpc_util import TLSConfig
    from pilot.tokenizer_client import fetch_tokenizer

    fetched = fetch_tokenizer(address, cache_dir=work_dir / "tokenizer-cache", tls=TLSConfig.from_env())
    return load_tokenizer(fetched, expected_sha256=expected_sha256)


def _restore_inner(work_dir: Path, model_config: dict, optimizers: list, keep: bool) -> int:
    """Load the inner optimiser state from the work dir; returns the inner step (0 when fresh)."""
    location = work_dir / INNER_STATE
    if not keep or not location.exists():
        return 0
    try:
        checkpoint = load_checkpoint(location, expect_model_config=model_config)
        load_optimizer_state_tensors(optimizers, checkpoint.group("optimizer"))
        return checkpoint.meta.step or 0
    except CheckpointError as exc:
        log.warning("discarding inner optimiser state", path=str(location), reason=str(exc))
        return 0


def run_local_round(
    order: RoundOrder, global_state: dict[str, torch.Tensor], who: TrainerIdentity, *, received_at: float
) -> LocalResult:
    cfg = parse_config(RunConfig, order.run_config, source="round order")
    # a trainer's own PILOT_REDIS_URL wins: the coordinator's address for Redis may not be this machine's
    client = redis_client(os.environ.get("PILOT_REDIS_URL") or cfg.redis_url or None)
    bus, ledger = Bus(client, cfg.run_id), Ledger(client, cfg.run_id)
    device = pick_device(who.device or cfg.device)
    autocast_dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed + order.round * 1009 + who.node_id % 1009)

    tokenizer = load_run_tokenizer(cfg, order.tokenizer_sha256, who.work_dir)
    shard_dir = resolve_data(who.data_path or resolve_named_source(cfg.data), paths.data_dir() / "imported")
    model_config = model_config_for(cfg.preset, tokenizer, cfg.seq_len, cfg.dropout)
    model = build_model(model_config, device=device)
    model.load_state_dict(global_state)
    optimizers = build_optimizers(model, optim_config_from(cfg))
    inner_step = _restore_inner(who.work_dir, model_config.to_dict(), optimizers, cfg.keep_inner_optimizer)
    schedule = LRSchedule(total_steps=NO_PLANNED_END, warmup_steps=cfg.warmup_steps, warmdown_ratio=0.0)

    feed = UnitFeed(ledger, cfg, who, tokenizer, shard_dir, order.round)
    batches = iter(feed)
    watcher = bus.stop_watcher(order.round, order.since_id)
    deadline = received_at + max(order.seconds - cfg.upload_margin_s, 0.0)
    grad_accum = cfg.grad_accum or 1
    steps, tokens, loss_sum, stopped_by = 0, 0, 0.0, "time"
    started = time.monotonic()
    setup_seconds = started - received_at
    last_progress = started
    bus.publish(ev.TrainerHeartbeat(trainer_id=who.trainer_id, node_id=str(who.node_id), round=order.round,
                                    state=ev.TRAINER_STATE_TRAINING, num_devices=1, device=str(device)))
    while True:
        if order.steps and steps >= order.steps:
            stopped_by = "steps"
            break
        if not order.steps and time.monotonic() >= deadline:
            stopped_by = "time"
            break
        if watcher.poll() is not None:
            stopped_by = "stop"
            break
        apply_lr(optimizers, schedule.multiplier(inner_step), inner_step)
        try:
            stats = train_step(model, optimizers, batches, grad_accum=grad_accum, device=device,
                               autocast_dtype=autocast_dtype)
        except StopIteration:
            stopped_by = "data"
            model.zero_grad(set_to_none=True)
            break
        steps, inner_step = steps + 1, inner_step + 1
        tokens += stats.tokens
        loss_sum += stats.loss
        now = time.monotonic()
        if now - last_progress >= cfg.progress_every_s:
            last_progress = now
            feed.renew()
            bus.publish(ev.TrainerProgress(
                trainer_id=who.trainer_id, round=order.round, step=steps, tokens=tokens,
                tokens_per_s=tokens / max(now - started, 1e-9), loss=stats.loss, elapsed_s=now - started,
            ))
    train_seconds = time.monotonic() - started
    units_completed = feed.settle()

    delta = pseudo_gradient(global_state, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    block = (cfg.int8_block or None) if cfg.update_dtype == "int8" else None
    codec = UpdateCodec(cfg.update_dtype, block)
    residual_path = who.work_dir / RESIDUAL_FILE
    residual = load_residual(residual_path, {k: tuple(v.shape) for k, v in delta.items()}) if codec.lossy else None
    encoded, residual = codec.encode(delta, residual)
    save_residual(residual_path, residual)
    if cfg.keep_inner_optimizer:
        meta = CheckpointMeta(kind="model", model_config=model_config.to_dict(), step=inner_step,
                              extra={"run_id": cfg.run_id, "round": order.round})
        save_checkpoint(who.work_dir / INNER_STATE, {"optimizer": optimizer_state_tensors(optimizers)}, meta,
                        overwrite=True)
    report = TrainerReport(
        tokens=tokens, steps=steps, mean_loss=loss_sum / steps if steps else float("nan"),
        train_seconds=train_seconds, setup_seconds=setup_seconds, units_completed=units_completed,
        stopped_by=stopped_by,
    )
    bus.publish(ev.TrainerHeartbeat(trainer_id=who.trainer_id, node_id=str(who.node_id), round=order.round,
                                    state=ev.TRAINER_STATE_UPLOADING, num_devices=1, device=str(device)))
    log.info("round trained", round=order.round, steps=steps, tokens=tokens, stopped_by=stopped_by,
             train_seconds=round(train_seconds, 2), setup_seconds=round(setup_seconds, 2))
    return LocalResult(encoded=encoded, report=report, units=feed.held)
