"""``pilot train``: vanilla (non-federated) training on one device or under torchrun DDP.

Every flag maps to a key of :class:`pilot.train_config.TrainConfig`; flags not
given fall back to ``PILOT_<KEY>`` environment variables, then to defaults.
Run the same command under ``torchrun --nproc_per_node=N -m pilot.cli train ...``
for DDP (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pilot.cli.common import user_errors

if TYPE_CHECKING:
    from pilot.train import TrainResult


def train_command(
    data: Annotated[Path, typer.Option(help="text file, or directory of parquet shards (last = validation)")],
    preset: Annotated[Optional[str], typer.Option(help="model preset: d<N> or shakespeare-char [d4]")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="byte | char | PATH of a tokenizer artifact [byte]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimiser steps [100]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="sequences per micro-batch per process [8]")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per sequence [256]")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="micro-batches per step [1]")] = None,
    total_batch_tokens: Annotated[Optional[int], typer.Option(help="tokens per step across processes")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="muon | adamw [muon]")] = None,
    lr_scale: Annotated[Optional[float], typer.Option(help="multiplies every learning rate [1.0]")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="linear lr warmup steps [0]")] = None,
    warmdown_ratio: Annotated[Optional[float], typer.Option(help="final fraction of steps decaying lr [0.2]")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="dropout probability [0]")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="steps between val BPB evals (0: start/end) [0]")] = None,
    eval_tokens: Annotated[Optional[int], typer.Option(help="val sample tokens (0: whole split) [65536]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed [1337]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N [auto]")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto | float32 | bfloat16 [auto: bf16 on CUDA]")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory [$PILOT_BASE_DIR/runs/train-<time>]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in --out")] = False,
    save_every: Annotated[Optional[int], typer.Option(help="steps between checkpoints (0: end only) [0]")] = None,
    json_out: Annotated[Optional[Path], typer.Option(help="write a JSON summary to this file")] = None,
) -> None:
    """Train a GPT on local data, non-federated (the baseline to compare federated runs with)."""
    flags = dict(locals())
    flags["resume"] = resume or None
    with user_errors():
        from pilot.config import build_config
        from pilot.log import bind_run, configure
        from pilot.runtime import dist_info_from_env, pick_device, distributed
        from pilot.train import run_training
        from pilot.train_config import TrainConfig

        configure(service="train")
        cfg = build_config(TrainConfig, flags, source="pilot train")
        dist = dist_info_from_env()
        with distributed(pick_device(cfg.device, dist.local_rank)) as dist:
            bind_run(rank=dist.rank) if dist.is_distributed else None
            result = run_training(cfg, dist)
        if dist.is_main:
            _print_summary(result)


def _print_summary(result: "TrainResult") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pilot train: validation bits per byte")
    for column in ("step", "tokens", "val BPB"):
        table.add_column(column, justify="right")
    for row in result.history:
        table.add_row(str(row["step"]), f"{row['tokens']:,}", f"{row['val_bpb']:.4f}")
    console = Console()
    console.print(table)
    console.print(
        f"{result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f} s "
        f"({result.tokens_per_s:,.0f} tokens/s on {result.device} x{result.world_size}); "
        f"checkpoint: {result.checkpoint}"
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
