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

Under DDP (``dist`` names this process's rank; ``services/trainer/ddp.py`` runs
the ranks) every rank calls this function: rank 0 loads W_r and DDP's start-up
broadcast gives it to the others; each rank draws its own batches (its own
leases) and DDP averages the gradients, so the replicas stay identical (Muon and
AdamW run replicated on the averaged gradients, as in ``pilot train``). Before
each step the ranks vote twice with one tiny all-reduce (MAX) each: first on
rank 0's view of the budget, the clock and the control stream, then, once every
rank has drawn the step's micro-batches, on whether any rank's data ran out; so
all ranks leave the loop at the same step and none waits on a rank that cannot
train (a step drawn but not trained is put back: its units keep their offsets
from before it, so nothing is skipped). At the end the ranks settle their own leases and gather their counts;
rank 0 alone encodes Δ, saves the residual and the inner optimiser state (the
same on every rank), publishes heartbeats and progress, and returns the whole
trainer's :class:`LocalResult`; the other ranks return None.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pilot import paths
from pilot.bus import Bus, StopWatcher, redis_client
from pilot.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pilot.config import parse_config
from pilot.errors import CheckpointError, ConfigError, TokenizerError
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
from pilot.runtime import DistInfo, pick_device, replicate, resolve_dtype, seed_everything
from pilot.tokenizer import Tokenizer, load_tokenizer
from pilot.train import model_config_for, optim_config_from, train_step
from pilot.v1 import events_pb2 as ev
from services.trainer.feeds import Feed, HeldUnit, make_feed
from services.trainer.identity import INNER_STATE, RESIDUAL_FILE, TrainerIdentity, default_work_dir  # noqa: F401

log = get_logger(__name__)

NO_PLANNED_END = 10**12  # federated inner schedule: warmup, then constant


SINGLE_PROCESS = DistInfo()
STOP_REASONS = ("", "steps", "time", "stop", "data")  # a rank's stop vote is its reason's index; "" = go on


@dataclass
class RankSummary:
    """What one rank did in a round (gathered on rank 0; the report sums them)."""

    rank: int
    steps: int
    tokens: int
    loss_sum: float  # sum of the rank's per-step mean losses
    units_completed: int
    units: list[HeldUnit] = field(default_factory=list)  # its leases, settled
    weights_sha256: str = ""  # of its final weights, when replicas are verified


@dataclass
class LocalResult:
    encoded: EncodedUpdate
    report: TrainerReport
    units: list[HeldUnit] = field(default_factory=list)  # every rank's leases
    ranks: list[RankSummary] = field(default_factory=list)  # one per rank, by rank


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


def _rank_device(spec: str, dist: DistInfo) -> torch.device:
    """This rank's device: rank k on ``cuda:k`` (or the CPU), matching the process group's backend."""
    device = pick_device(spec, dist.local_rank)
    if not dist.is_distributed:
        return device
    if device.type == "cuda" and device.index != dist.local_rank:
        raise ConfigError(f"device {spec!r}: with num-devices > 1 rank {dist.rank} trains on cuda:{dist.local_rank}; "
                          "name the device 'cuda' (or 'auto')")
    backend = torch.distributed.get_backend()
    if backend != ("nccl" if device.type == "cuda" else "gloo"):
        raise ConfigError(f"device {spec!r}: this trainer's rank group runs {backend}, which does not fit {device}")
    return device


def _agree_stop(reason: str, dist: DistInfo, device: torch.device) -> str:
    """The reason every rank stops for ("" = train on): one all-reduce MAX over the ranks' votes."""
    if not dist.is_distributed:
        return reason
    vote = torch.tensor([STOP_REASONS.index(reason)], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX)
    return STOP_REASONS[int(vote.item())]


def _draw_step(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], grad_accum: int) -> list | None:
    """The next step's micro-batches, or None when the feed ran dry."""
    drawn = []
    for _ in range(grad_accum):
        batch = next(batches, None)
        if batch is None:
            return None
        drawn.append(batch)
    return drawn


def _positions(feed: Feed) -> list[tuple[HeldUnit, int, int, bool]]:
    return [(unit, unit.offset, unit.tokens, unit.done) for unit in feed.held]


def _undraw(feed: Feed, before: list[tuple[HeldUnit, int, int, bool]]) -> None:
    """Put the feed's units back where they were before a step that was drawn but never trained.

    Such a step happens when another rank's data ran out (or this rank's ran out
    halfway through the step); its batches go back to the ledger untrained.
    """
    known = {id(unit) for unit, *_ in before}
    for unit, offset, tokens, done in before:
        unit.offset, unit.tokens, unit.done = offset, tokens, done
    for unit in feed.held:
        if id(unit) not in known:
            unit.offset, unit.tokens, unit.done = unit.lease.offset, 0, False


def _barrier_if(dist: DistInfo, condition: bool) -> None:
    """Rank-0-first set-up: ranks > 0 wait here until rank 0 reaches its matching call."""
    if dist.is_distributed and condition:
        torch.distributed.barrier()


def _state_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gather(summary: RankSummary, dist: DistInfo) -> list[RankSummary]:
    if not dist.is_distributed:
        return [summary]
    gathered: list[RankSummary | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, summary)
    return [s for s in gathered if s is not None]


def _group_report(summaries: list[RankSummary], verify_replicas: bool) -> tuple[int, int, float, int]:
    """(steps, tokens, mean loss, units completed) over the ranks; checks that they agree."""
    steps = {s.steps for s in summaries}
    if len(steps) != 1:
        raise RuntimeError(f"DDP ranks left the round at different steps: {sorted(steps)}")
    if verify_replicas and len({s.weights_sha256 for s in summaries}) != 1:
        raise RuntimeError("DDP replicas diverged: " + ", ".join(f"rank {s.rank} {s.weights_sha256[:12]}"
                                                                 for s in summaries))
    (step_count,) = steps
    tokens = sum(s.tokens for s in summaries)
    mean_loss = sum(s.loss_sum for s in summaries) / (step_count * len(summaries)) if step_count else float("nan")
    return step_count, tokens, mean_loss, sum(s.units_completed for s in summaries)


def inner_schedule(cfg: RunConfig) -> LRSchedule:
    """The federated inner lr schedule: warmup over the trainer's inner steps, then constant."""
    return LRSchedule(total_steps=NO_PLANNED_END, warmup_steps=cfg.warmup_steps, warmdown_ratio=0.0)


def _round_over(order: RoundOrder, steps: int, deadline: float, watcher: StopWatcher | None) -> str:
    """Rank 0's view: why the round is over ("" while it is not)."""
    if order.steps and steps >= order.steps:
        return "steps"
    if not order.steps and time.monotonic() >= deadline:
        return "time"
    if watcher is not None and watcher.poll() is not None:
        return "stop"
    return ""


def run_local_round(
    order: RoundOrder, global_state: dict[str, torch.Tensor] | None, who: TrainerIdentity, *, received_at: float,
    dist: DistInfo = SINGLE_PROCESS, verify_replicas: bool = False,
) -> LocalResult | None:
    """Train this rank's share of a round; rank 0 gets the trainer's result, other ranks None.

    ``global_state`` (W_r) is needed on rank 0 only. ``verify_replicas``: every
    rank hashes its final weights and rank 0 refuses to reply if they differ.
    """
    cfg = parse_config(RunConfig, order.run_config, source="round order")
    # a trainer's own PILOT_REDIS_URL wins: the coordinator's address for Redis may not be this machine's
    client = redis_client(os.environ.get("PILOT_REDIS_URL") or cfg.redis_url or None)
    bus, ledger = Bus(client, cfg.run_id), Ledger(client, cfg.run_id)
    device = _rank_device(who.device or cfg.device, dist)
    autocast_dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed + order.round * 1009 + who.node_id % 1009 + dist.rank * 7919)

    # rank 0 fetches the tokenizer and imports the data first (no collective in between)
    _barrier_if(dist, not dist.is_main)
    tokenizer = load_run_tokenizer(cfg, order.tokenizer_sha256, who.work_dir)
    model_config = model_config_for(cfg.preset, tokenizer, cfg.seq_len, cfg.dropout)
    model = build_model(model_config, device=device)
    if dist.is_main:
        assert global_state is not None, "rank 0 needs the global weights"
        model.load_state_dict(global_state)
    optimizers = build_optimizers(model, optim_config_from(cfg))
    inner_step = _restore_inner(who.work_dir, model_config.to_dict(), optimizers, cfg.keep_inner_optimizer)
    schedule = inner_schedule(cfg)

    feed = make_feed(ledger, cfg, who, tokenizer, order.round, rank=dist.rank)
    _barrier_if(dist, dist.is_main)  # the other ranks may now read what rank 0 fetched or imported
    train_model = replicate(model, dist, device, compile=cfg.compile)  # DDP broadcasts rank 0's weights
    batches = iter(feed)
    watcher = bus.stop_watcher(order.round, order.since_id) if dist.is_main else None
    deadline = received_at + max(order.seconds - cfg.upload_margin_s, 0.0)
    grad_accum = cfg.grad_accum or 1
    steps, tokens, loss_sum = 0, 0, 0.0
    started = time.monotonic()
    setup_seconds = started - received_at
    last_progress = started
    if dist.is_main:
        bus.publish(ev.TrainerHeartbeat(trainer_id=who.trainer_id, node_id=str(who.node_id), round=order.round,
                                        state=ev.TRAINER_STATE_TRAINING, num_devices=dist.world_size,
                                        device=str(device)))
    while True:
        stopped_by = _agree_stop(_round_over(order, steps, deadline, watcher) if dist.is_main else "", dist, device)
        if stopped_by:
            break
        before = _positions(feed)
        step_batches = _draw_step(batches, grad_accum)
        stopped_by = _agree_stop("data" if step_batches is None else "", dist, device)
        if stopped_by or step_batches is None:
            _undraw(feed, before)
            break
        apply_lr(optimizers, schedule.multiplier(inner_step), inner_step)
        stats = train_step(train_model, optimizers, iter(step_batches), grad_accum=grad_accum, device=device,
                           autocast_dtype=autocast_dtype)
        steps, inner_step = steps + 1, inner_step + 1
        tokens += stats.tokens
        loss_sum += stats.loss
        now = time.monotonic()
        if now - last_progress >= cfg.progress_every_s:
            last_progress = now
            feed.renew()  # every rank keeps its own leases alive
            if dist.is_main:  # tokens of the whole trainer, assuming the ranks draw alike (the report is exact)
                bus.publish(ev.TrainerProgress(
                    trainer_id=who.trainer_id, round=order.round, step=steps, tokens=tokens * dist.world_size,
                    tokens_per_s=tokens * dist.world_size / max(now - started, 1e-9), loss=stats.loss,
                    elapsed_s=now - started,
                ))
    train_seconds = time.monotonic() - started
    mine = RankSummary(rank=dist.rank, steps=steps, tokens=tokens, loss_sum=loss_sum,
                       units_completed=feed.settle(), units=list(feed.held),
                       weights_sha256=_state_sha256(model) if verify_replicas else "")
    summaries = _gather(mine, dist)
    if not dist.is_main:
        return None
    steps, tokens, mean_loss, units_completed = _group_report(summaries, verify_replicas)

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
        tokens=tokens, steps=steps, mean_loss=mean_loss, train_seconds=train_seconds, setup_seconds=setup_seconds,
        units_completed=units_completed, stopped_by=stopped_by,
    )
    bus.publish(ev.TrainerHeartbeat(trainer_id=who.trainer_id, node_id=str(who.node_id), round=order.round,
                                    state=ev.TRAINER_STATE_UPLOADING, num_devices=dist.world_size,
                                    device=str(device)))
    log.info("round trained", round=order.round, steps=steps, tokens=tokens, stopped_by=stopped_by,
             ranks=dist.world_size, train_seconds=round(train_seconds, 2), setup_seconds=round(setup_seconds, 2))
    return LocalResult(encoded=encoded, report=report, units=[u for r in summaries for u in r.units],
                       ranks=summaries)
