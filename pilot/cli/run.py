"""``pilot run``: federated training on one box (what ``make run`` runs).

Starts the embedded Redis, a Flower SuperLink with ``--trainers`` SuperNodes,
the evaluator worker and the event log, submits the run, shows live progress,
and ends with a summary table (train loss, val BPB, val loss, perplexity) and
``<run_dir>/report.md``. ``--task shakespeare`` is the Flower NanoGPT
Tiny-Shakespeare reproduction (see pilot.run_config.TASK_DEFAULTS); flags and
``--run-config`` keys override the task's defaults. Flags cover the common knobs; ``--run-config "key=value ..."`` sets any other key of the run
config (the same keys ``flwr run --run-config`` takes). Ctrl-C stops every
process it started.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pilot.cli.common import user_errors

if TYPE_CHECKING:
    from pilot.launcher import LocalRunResult


def run_command(
    trainers: Annotated[int, typer.Option(help="local trainers (SuperNodes) to start", min=1)] = 2,
    task: Annotated[Optional[str], typer.Option(help="pretrain | shakespeare (sets that task's defaults)")] = None,
    data: Annotated[Optional[str], typer.Option(help="text file, shard dir, or 'shakespeare' [shakespeare]")] = None,
    preset: Annotated[Optional[str], typer.Option(help="model preset d<N> | shakespeare-char")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="byte | char | PATH of a tokenizer artifact")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="rounds to run")] = None,
    round_seconds: Annotated[Optional[float], typer.Option(help="training seconds per round")] = None,
    round_steps: Annotated[Optional[int], typer.Option(help="inner steps per round (instead of seconds)")] = None,
    outer: Annotated[Optional[str], typer.Option(help="outer optimiser: fedavg | diloco")] = None,
    update_dtype: Annotated[Optional[str], typer.Option(help="update encoding: fp32 | bf16 | int8")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="run id [run-<time>]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run dir [$PILOT_BASE_DIR/runs/<run-id>]")] = None,
    run_config: Annotated[Optional[str], typer.Option("--run-config", help='more keys: "k=v k2=\'text\'"')] = None,
    redis: Annotated[Optional[str], typer.Option("--redis", help="Redis URL (default: an embedded server)")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="stop the run after this many seconds")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="start over even if the run dir has checkpoints")] = False,
) -> None:
    """Train federated across local trainers, with live progress and a report at the end."""
    with user_errors():
        from flwr.common.config import parse_config_args

        from pilot.launcher import run_local
        from pilot.log import configure
        from pilot.run_config import run_config_from

        configure(service="pilot-run")
        extra = parse_config_args([run_config]) if run_config else {}
        flags = {
            "task": task, "data": data, "preset": preset, "tokenizer": tokenizer, "rounds": rounds,
            "round-seconds": round_seconds, "round-steps": round_steps, "outer": outer,
            "update-dtype": update_dtype, "device": device, "out": out, "fresh": fresh or None,
        }
        defaults = {
            "run-id": run_id or extra.pop("run-id", None) or f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
            "data": "shakespeare", "min-trainers": trainers, "round-seconds": 60.0,
        }
        cfg = run_config_from(defaults, extra, flags, source="pilot run")
        result = run_local(cfg, trainers, redis_url=redis, timeout_s=timeout)
        _print_summary(result)


def _print_summary(result: LocalRunResult) -> None:
    import math

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pilot run: {result.run_dir.name}")
    for column in ("round", "trainers", "tokens", "train loss", "val BPB", "val loss", "perplexity", "wall s"):
        table.add_column(column, justify="right")
    losses = {int(e["round"]): e.get("loss") for e in result.evals if e.get("status") == "ok"}
    for row in result.rounds:
        loss = losses.get(int(row["round"]))
        table.add_row(
            str(row["round"]), str(row["trainers"]), f"{row['tokens']:,}",
            "-" if row["mean_loss"] is None else f"{row['mean_loss']:.4f}",
            "-" if row["val_bpb"] is None else f"{row['val_bpb']:.4f}",
            "-" if loss is None else f"{loss:.4f}", "-" if loss is None else f"{math.exp(min(loss, 700)):.2f}",
            "-" if row["wall_s"] is None else f"{row['wall_s']:.1f}",
        )
    console = Console()
    console.print(table)
    console.print(f"run dir: {result.run_dir}  report: {result.report}  ({result.wall_s:.0f} s)")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
