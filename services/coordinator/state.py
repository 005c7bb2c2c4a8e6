"""The coordinator's run state: what it needs to resume, where it lives, and how a round is saved.

- :func:`prepare_run`: the run dir, the data (imported once, split as the
  run's task says), the tokenizer (kept in ``<run_dir>/tokenizer`` so every
  trainer and the evaluator use the same one), the model config, and — with
  ``partition='ledger'`` — the data ledger's work units (initialised once per
  run; ``init_epoch`` is idempotent, so a restart keeps the ledger).
- :func:`restore_state`: the last closed round's weights and outer momentum
  from ``<run_dir>/checkpoints/round_NNNNN`` (bit-identical), or round 0's
  seeded initial weights when the run is new. ``fresh`` moves earlier
  checkpoints aside (never deletes them).
- :func:`save_round`: the round checkpoint (``model`` + ``outer_momentum``
  groups, written atomically with sha256s) and the digest the evaluator checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pilot.checkpoint import CheckpointMeta, TokenizerIdentity, latest_checkpoint, load_checkpoint, save_checkpoint
from pilot.checkpoint.meta import SIDECAR_NAME
from pilot.checkpoint.rundir import checkpoints_dir, prune_checkpoints, round_checkpoint_path
from pilot.data import count_unit_tokens, list_shards, work_units
from pilot.data.shards import read_shard_texts
from pilot.federated import OuterConfig, OuterOptimizer
from pilot.hashing import sha256_file
from pilot.ledger import Ledger
from pilot.log import get_logger
from pilot.model import GPTConfig, build_model
from pilot.run_config import RunConfig
from pilot.runtime import seed_everything
from pilot.tokenizer import Tokenizer, load_tokenizer
from pilot.train import model_config_for

log = get_logger(__name__)

MOMENTUM_GROUP = "outer_momentum"


@dataclass
class RunAssets:
    run_dir: Path
    shard_dir: Path
    tokenizer: Tokenizer
    model_config: GPTConfig


@dataclass
class RunState:
    round: int  # the last closed round (0: only the initial weights exist)
    weights: dict[str, torch.Tensor]  # W_round, fp32, CPU
    outer: OuterOptimizer
    tokens: int  # tokens aggregated into the weights so far
    checkpoint: Path | None  # the checkpoint these weights came from


def _run_tokenizer(cfg: RunConfig, run_dir: Path, shard_dir: Path) -> Tokenizer:
    saved = run_dir / "tokenizer"
    if saved.exists():
        return load_tokenizer(saved)
    if cfg.tokenizer == "char":
        train, val = list_shards(shard_dir)
        tokenizer = load_tokenizer("char", text_for_char="".join("".join(read_shard_texts(p)) for p in [*train, val]))
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer.save(saved)
    return tokenizer


def prepare_run(cfg: RunConfig, ledger: Ledger) -> RunAssets:
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = cfg.shard_dir()
    tokenizer = _run_tokenizer(cfg, run_dir, shard_dir)
    model_config = model_config_for(cfg.preset, tokenizer, cfg.seq_len, cfg.dropout)
    if cfg.partition == "contiguous":  # trainers slice the train text themselves: no work units to lease
        log.info("contiguous partitions: no ledger", task=cfg.task, data=str(shard_dir))
        return RunAssets(run_dir=run_dir, shard_dir=shard_dir, tokenizer=tokenizer, model_config=model_config)
    train_shards, _ = list_shards(shard_dir)
    started = time.perf_counter()
    units = {u.key: count_unit_tokens(u.path, u.row_group, tokenizer) for u in work_units(train_shards)}
    created = ledger.init_epoch(units)
    log.info("ledger ready", units=len(units), tokens=sum(units.values()), created=created,
             seconds=round(time.perf_counter() - started, 2))
    return RunAssets(run_dir=run_dir, shard_dir=shard_dir, tokenizer=tokenizer, model_config=model_config)


def outer_config(cfg: RunConfig) -> OuterConfig:
    return OuterConfig(kind=cfg.outer, lr=cfg.outer_lr_value, momentum=cfg.outer_momentum_value,
                       nesterov=cfg.outer == "diloco")


def restore_state(cfg: RunConfig, assets: RunAssets) -> RunState:
    ckpt_dir = checkpoints_dir(assets.run_dir)
    if cfg.fresh and ckpt_dir.exists():
        aside = ckpt_dir.with_name(f"checkpoints.before-fresh-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        log.warning("fresh start: earlier checkpoints moved aside", path=str(aside))
    outer = OuterOptimizer(outer_config(cfg))
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        seed_everything(cfg.seed)
        weights = {k: v.detach().cpu().float() for k, v in build_model(assets.model_config).state_dict().items()}
        return RunState(round=0, weights=weights, outer=outer, tokens=0, checkpoint=None)
    checkpoint = load_checkpoint(latest, expect_model_config=assets.model_config.to_dict())
    if MOMENTUM_GROUP in checkpoint.tensors:
        outer.load_state_tensors(checkpoint.group(MOMENTUM_GROUP))
    log.info("resumed", checkpoint=str(latest), round=checkpoint.meta.round, tokens=checkpoint.meta.tokens_seen)
    return RunState(round=checkpoint.meta.round or 0, weights=checkpoint.model, outer=outer,
                    tokens=checkpoint.meta.tokens_seen, checkpoint=latest)


def save_round(cfg: RunConfig, assets: RunAssets, state: RunState, extra: dict) -> tuple[Path, str]:
    """Write ``round_<state.round>``; returns its path and the sha256 of its sidecar."""
    path = round_checkpoint_path(checkpoints_dir(assets.run_dir), state.round)
    meta = CheckpointMeta(
        kind="round",
        round=state.round,
        tokens_seen=state.tokens,
        model_config=assets.model_config.to_dict(),
        tokenizer=TokenizerIdentity(name=assets.tokenizer.name, sha256=assets.tokenizer.sha256),
        extra={"run_id": cfg.run_id, "outer": cfg.outer, **extra},
    )
    groups = {"model": state.weights}
    momentum = state.outer.state_tensors()
    if momentum:
        groups[MOMENTUM_GROUP] = momentum
    save_checkpoint(path, groups, meta, overwrite=True)
    if cfg.keep_checkpoints:
        prune_checkpoints(checkpoints_dir(assets.run_dir), cfg.keep_checkpoints)
    state.checkpoint = path
    return path, sha256_file(path / SIDECAR_NAME)
