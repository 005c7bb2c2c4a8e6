"""The typed configs of training: the knobs every trainer shares, and ``pilot train``'s.

:class:`TrainingKnobs` holds what the vanilla loop and the federated trainers
have in common (model preset, data, tokenizer, batch, inner optimiser, device);
:class:`TrainConfig` adds what only ``pilot train`` has (steps, eval cadence,
outputs, resume). The federated run's config (``pilot.run_config.RunConfig``)
derives from the same knobs, so a flag means the same thing everywhere.

Each config is built once by :func:`pilot.config.build_config` from flags,
run-config and ``PILOT_*`` env vars; every problem is reported as a
:class:`~pilot.errors.ConfigError` naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pilot.config import PilotSettings


class TrainingKnobs(PilotSettings):
    # --- model -------------------------------------------------------------
    preset: str = "d4"  # d<N> (dim = 64·N) or shakespeare-char
    seq_len: int = Field(256, gt=0)  # tokens per sequence (the model's context)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # --- data --------------------------------------------------------------
    data: Path  # a text file, a directory of parquet shards (last = validation), or 'shakespeare'
    tokenizer: str = "byte"  # byte | char | PATH of a tokenizer artifact
    # --- batch ---------------------------------------------------------------
    batch_size: int = Field(8, gt=0)  # sequences per micro-batch per process
    grad_accum: int | None = Field(None, gt=0)  # micro-batches per step (default 1)
    # --- optimiser ---------------------------------------------------------
    optimizer: Literal["muon", "adamw"] = "muon"
    lr_scale: float = Field(1.0, gt=0)  # multiplies every learning rate
    adamw_lr: float = Field(1e-3, gt=0)  # lr of the plain AdamW optimiser
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    warmdown_ratio: float = Field(0.2, ge=0, le=1)
    final_lr_frac: float = Field(0.0, ge=0, le=1)
    # --- evaluation ----------------------------------------------------------
    eval_tokens: int = Field(65_536, ge=0)  # val sample size in tokens (0: whole split)
    # --- runtime -----------------------------------------------------------
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False


class TrainConfig(TrainingKnobs):
    steps: int = Field(100, gt=0)  # optimiser steps
    total_batch_tokens: int | None = Field(None, gt=0)  # instead of grad-accum: tokens per step, all processes
    eval_every: int = Field(0, ge=0)  # steps between val evals (0: start and end only)
    # --- outputs -----------------------------------------------------------
    out: Path | None = None  # run dir (default $PILOT_BASE_DIR/runs/train-<time>)
    resume: bool = False  # continue from the latest checkpoint in --out
    save_every: int = Field(0, ge=0)  # steps between checkpoints (0: end only)
    json_out: Path | None = None  # write a JSON summary here

    @model_validator(mode="after")
    def _batch_is_consistent(self) -> "TrainConfig":
        if self.grad_accum is not None and self.total_batch_tokens is not None:
            raise ValueError("give either grad-accum or total-batch-tokens, not both")
        return self

    def micro_batch_tokens(self) -> int:
        return self.batch_size * self.seq_len

    def resolve_grad_accum(self, world_size: int) -> int:
        """Micro-batches per step; total-batch-tokens must divide evenly."""
        from pilot.errors import ConfigError

        if self.total_batch_tokens is None:
            return self.grad_accum or 1
        per_pass = self.micro_batch_tokens() * world_size
        if self.total_batch_tokens % per_pass:
            raise ConfigError(
                f"total-batch-tokens={self.total_batch_tokens} is not a multiple of "
                f"batch-size × seq-len × processes = {self.batch_size}×{self.seq_len}×{world_size} = {per_pass}"
            )
        return self.total_batch_tokens // per_pass
