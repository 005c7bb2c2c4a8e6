"""Vanilla (non-federated) training: ``pilot train`` on one device or under torchrun DDP.

What this module does:
- ``build_session(cfg)``: tokenizer, data, model, optimisers, schedule, loader and
  validation set from one validated :class:`~pilot.train_config.TrainConfig`;
  ``--resume`` restores weights, optimiser state, step, tokens and the loader
  cursor from the latest checkpoint in ``--out`` (refusing one of another model).
- ``train_step``: one optimiser step of ``grad_accum`` micro-batches, with DDP's
  ``no_sync`` on all but the last one and autocast on CUDA. The federated
  trainer calls this same function, so both paths share one inner loop.
- ``run_training(cfg)``: the loop, val BPB at the start / every ``eval_every`` /
  the end, checkpoints, a rich progress bar on a TTY, and a JSON summary.

The same code path runs with and without DDP: ``torchrun --nproc_per_node=N
-m pilot.cli train ...`` (gloo on CPU, NCCL on GPU); rank r reads every r-th
slice of each global batch, so N processes × batch B train on the same tokens
as one process with batch N·B.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pilot import paths
from pilot.checkpoint import CheckpointMeta, TokenizerIdentity, latest_checkpoint, load_checkpoint, save_checkpoint
from pilot.checkpoint.rundir import checkpoints_dir, round_checkpoint_path
from pilot.data import TokenLoader, ValidationSet, list_shards, resolve_data, validation_batches
from pilot.data.shards import read_shard_texts
from pilot.errors import CheckpointError, ConfigError
from pilot.evaluate import evaluate_bpb
from pilot.log import get_logger
from pilot.model import GPT, GPTConfig, build_model, preset_config
from pilot.optim import (
    LRSchedule,
    OptimConfig,
    apply_lr,
    build_optimizers,
    load_optimizer_state_tensors,
    optimizer_state_tensors,
)
from pilot.sources import resolve_named_source
from pilot.runtime import DistInfo, autocast, pick_device, replicate, resolve_dtype, seed_everything
from pilot.tokenizer import Tokenizer, load_tokenizer
from pilot.train_config import TrainConfig

log = get_logger(__name__)

STEP_PREFIX = "step"  # checkpoint directories: <out>/checkpoints/step_00100
TOKENIZER_SUBDIR = "tokenizer"


# --- building blocks shared with the federated trainer ------------------------------


def optim_config_from(cfg: TrainConfig) -> OptimConfig:
    """The optimiser config a TrainConfig describes (lr-scale multiplies every lr)."""
    base = OptimConfig()
    if cfg.optimizer == "adamw":
        return OptimConfig(kind="adamw", lr=cfg.adamw_lr * cfg.lr_scale, weight_decay=cfg.weight_decay)
    return OptimConfig(
        kind="muon",
        embedding_lr=base.embedding_lr * cfg.lr_scale,
        unembedding_lr=base.unembedding_lr * cfg.lr_scale,
        matrix_lr=base.matrix_lr * cfg.lr_scale,
        weight_decay=cfg.weight_decay,
    )


def model_config_for(preset: str, tokenizer: Tokenizer, seq_len: int, dropout: float) -> GPTConfig:
    base = preset_config(preset, vocab_size=tokenizer.vocab_size, sequence_len=seq_len)
    return GPTConfig(**{**base.to_dict(), "dropout": dropout})


@dataclass
class StepStats:
    loss: float  # mean training loss over the step's micro-batches
    tokens: int  # tokens this process trained on in the step


def train_step(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    grad_accum: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> StepStats:
    """One optimiser step over ``grad_accum`` micro-batches drawn from ``batches``.

    ``model`` may be DDP-wrapped: gradients are then synchronised once, on the
    last micro-batch. Losses are scaled by 1/grad_accum so the step equals one
    big batch.
    """
    total_loss = 0.0
    tokens = 0
    sync_context = getattr(model, "no_sync", None)
    for micro in range(grad_accum):
        inputs, targets = next(batches)
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        last = micro == grad_accum - 1
        context = sync_context() if (sync_context is not None and not last) else _null_context()
        with context:
            with autocast(device, autocast_dtype):
                loss = model(inputs, targets)
            (loss / grad_accum).backward()
        total_loss += float(loss.detach())
        tokens += int((targets >= 0).sum())
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return StepStats(loss=total_loss / grad_accum, tokens=tokens)


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --- a vanilla training session -----------------------------------------------------


@dataclass
class Session:
    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    autocast_dtype: torch.dtype | None
    out_dir: Path
    tokenizer: Tokenizer
    model_config: GPTConfig
    model: GPT
    optimizers: list[torch.optim.Optimizer]
    schedule: LRSchedule
    loader: TokenLoader
    val: ValidationSet
    grad_accum: int
    step: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _default_out_dir() -> Path:
    return paths.runs_dir() / f"train-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _load_session_tokenizer(cfg: TrainConfig, shard_dir: Path, out_dir: Path) -> Tokenizer:
    """The run's tokenizer; a char alphabet is built from the data once and kept in the run dir."""
    saved = out_dir / TOKENIZER_SUBDIR
    if cfg.resume and saved.exists():
        return load_tokenizer(saved)
    if cfg.tokenizer != "char":
        return load_tokenizer(cfg.tokenizer)
    train, val = list_shards(shard_dir)
    text = "".join("".join(read_shard_texts(p)) for p in [*train, val])
    return load_tokenizer("char", text_for_char=text)


def build_session(cfg: TrainConfig, dist: DistInfo) -> Session:
    device = pick_device(cfg.device, dist.local_rank)
    autocast_dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    out_dir = (cfg.out or _default_out_dir()).expanduser().resolve()
    ckpt_dir = checkpoints_dir(out_dir)
    previous = latest_checkpoint(ckpt_dir, prefix=STEP_PREFIX)
    if previous is not None and not cfg.resume:
        raise ConfigError(f"out: {out_dir} already holds checkpoints ({previous.name}); pass --resume or another --out")
    if cfg.resume and previous is None:
        raise ConfigError(f"resume: no checkpoint to resume from in {ckpt_dir}")

    shard_dir = resolve_data(resolve_named_source(cfg.data), paths.data_dir() / "imported")
    train_shards, val_shard = list_shards(shard_dir)
    tokenizer = _load_session_tokenizer(cfg, shard_dir, out_dir)
    model_config = model_config_for(cfg.preset, tokenizer, cfg.seq_len, cfg.dropout)
    grad_accum = cfg.resolve_grad_accum(dist.world_size)

    model = build_model(model_config, device=device)
    optimizers = build_optimizers(model, optim_config_from(cfg))
    schedule = LRSchedule(
        total_steps=cfg.steps,
        warmup_steps=min(cfg.warmup_steps, cfg.steps),
        warmdown_ratio=cfg.warmdown_ratio,
        final_lr_frac=cfg.final_lr_frac,
    )
    step, tokens, cursor, history = 0, 0, None, []
    if previous is not None:
        checkpoint = load_checkpoint(previous, expect_model_config=model_config.to_dict(), device=device)
        if checkpoint.meta.tokenizer and checkpoint.meta.tokenizer.sha256 != tokenizer.sha256:
            raise CheckpointError(f"checkpoint {previous} was trained with another tokenizer than {cfg.tokenizer!r}")
        model.load_state_dict(checkpoint.model)
        load_optimizer_state_tensors(optimizers, checkpoint.group("optimizer"))
        step, tokens = checkpoint.meta.step or 0, checkpoint.meta.tokens_seen
        cursor = checkpoint.meta.extra.get("cursor")
        history = list(checkpoint.meta.extra.get("history", []))
        log.info("resumed", checkpoint=str(previous), step=step, tokens=tokens)
    loader = TokenLoader(
        train_shards,
        tokenizer,
        cfg.batch_size,
        cfg.seq_len,
        cursor=cursor,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.seed,
    )
    val = validation_batches(
        val_shard, tokenizer, cfg.batch_size, cfg.seq_len, max_tokens=cfg.eval_tokens or None, seed=cfg.seed
    )
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / TOKENIZER_SUBDIR).exists():
            tokenizer.save(out_dir / TOKENIZER_SUBDIR)
    return Session(
        cfg=cfg, dist=dist, device=device, autocast_dtype=autocast_dtype, out_dir=out_dir, tokenizer=tokenizer,
        model_config=model_config, model=model, optimizers=optimizers, schedule=schedule, loader=loader, val=val,
        grad_accum=grad_accum, step=step, tokens=tokens, history=history,
    )


def evaluate(session: Session) -> float:
    result = evaluate_bpb(
        session.model,
        session.val.iter_batches(session.dist.rank, session.dist.world_size),
        session.tokenizer.token_bytes(),
        device=session.device,
        autocast_dtype=session.autocast_dtype,
    )
    return result.bpb


def save(session: Session) -> Path:
    """Write ``<out>/checkpoints/step_<n>`` (rank 0 only; the others wait at a barrier)."""
    path = round_checkpoint_path(checkpoints_dir(session.out_dir), session.step, prefix=STEP_PREFIX)
    if session.dist.is_main:
        meta = CheckpointMeta(
            kind="model",
            model_config=session.model_config.to_dict(),
            step=session.step,
            tokens_seen=session.tokens,
            tokenizer=TokenizerIdentity(name=session.tokenizer.name, sha256=session.tokenizer.sha256),
            extra={
                "cursor": session.loader.cursor.to_dict(),
                "train_config": session.cfg.as_run_config(),
                "history": session.history,
                "world_size": session.dist.world_size,
            },
        )
        tensors = {"model": session.model.state_dict(), "optimizer": optimizer_state_tensors(session.optimizers)}
        save_checkpoint(path, tensors, meta, overwrite=True)
    if session.dist.is_distributed:
        torch.distributed.barrier()
    return path


@dataclass
class TrainResult:
    initial_val_bpb: float
    final_val_bpb: float
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float
    checkpoint: str
    device: str
    world_size: int
    parameters: int
    history: list[dict[str, Any]] = field(default_factory=list)  # val BPB by step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _progress(enabled: bool, total: int, completed: int):  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    task = progress.add_task("train", total=total, completed=completed, loss=float("nan"), tps=0.0)
    return progress, task


def run_training(cfg: TrainConfig, dist: DistInfo) -> TrainResult:
    """Train as ``cfg`` says; returns the summary (rank 0's view; all ranks agree on BPB)."""
    session = build_session(cfg, dist)
    model = session.model
    train_model = replicate(model, dist, session.device, compile=cfg.compile)
    log.info(
        "training",
        preset=cfg.preset,
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(session.device),
        world_size=dist.world_size,
        grad_accum=session.grad_accum,
        tokens_per_step=cfg.batch_size * cfg.seq_len * session.grad_accum * dist.world_size,
        out=str(session.out_dir),
    )
    initial_bpb = evaluate(session) if session.step == 0 or not session.history else session.history[0]["val_bpb"]
    if session.step == 0:
        session.history.append({"step": 0, "tokens": 0, "val_bpb": initial_bpb})
    show_bar = dist.is_main and sys.stderr.isatty() and os.environ.get("CI") != "true"
    progress, task = _progress(show_bar, cfg.steps, session.step)
    started = time.perf_counter()
    start_tokens = session.tokens
    loss = float("nan")
    with progress:
        while session.step < cfg.steps:
            apply_lr(session.optimizers, session.schedule.multiplier(session.step), session.step)
            stats = train_step(
                train_model, session.optimizers, session.loader,
                grad_accum=session.grad_accum, device=session.device, autocast_dtype=session.autocast_dtype,
            )
            if not math.isfinite(stats.loss):
                raise ConfigError(f"training diverged at step {session.step} (loss {stats.loss}); lower --lr-scale")
            session.step += 1
            session.tokens += stats.tokens * dist.world_size
            loss = stats.loss
            elapsed = time.perf_counter() - started
            tps = (session.tokens - start_tokens) / max(elapsed, 1e-9)
            progress.update(task, completed=session.step, loss=loss, tps=tps)
            if not show_bar and dist.is_main and (session.step % 10 == 0 or session.step == cfg.steps):
                log.info("step", step=session.step, loss=round(loss, 4), tokens_per_s=round(tps))
            if cfg.eval_every and session.step % cfg.eval_every == 0 and session.step < cfg.steps:
                bpb = evaluate(session)
                session.history.append({"step": session.step, "tokens": session.tokens, "val_bpb": bpb})
                log.info("eval", step=session.step, val_bpb=round(bpb, 4))
            if cfg.save_every and session.step % cfg.save_every == 0 and session.step < cfg.steps:
                save(session)
    seconds = time.perf_counter() - started
    final_bpb = evaluate(session)
    if not session.history or session.history[-1]["step"] != session.step:
        session.history.append({"step": session.step, "tokens": session.tokens, "val_bpb": final_bpb})
    checkpoint = save(session)
    result = TrainResult(
        initial_val_bpb=initial_bpb,
        final_val_bpb=final_bpb,
        steps=session.step,
        tokens=session.tokens,
        seconds=seconds,
        tokens_per_s=(session.tokens - start_tokens) / max(seconds, 1e-9),
        final_loss=loss,
        checkpoint=str(checkpoint),
        device=str(session.device),
        world_size=dist.world_size,
        parameters=sum(p.numel() for p in model.parameters()),
        history=session.history,
    )
    if dist.is_main and cfg.json_out is not None:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps(result.to_dict(), indent=2))
    return result
