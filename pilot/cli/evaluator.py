"""`pilot evaluator`, `pilot eval`, `pilot sample`: score checkpoints, as a service or by hand.

- ``pilot evaluator --redis URL --data DIR_OR_FILE [--device cpu] [--eval-tokens N]
  [--sample-tokens N] [--concurrency 1] [--grpc-port P] [--no-wandb]`` runs the
  evaluation worker (services/evaluator/worker.py) on the ``pilot.eval`` queue,
  with the Evaluator gRPC service in the same process when ``--grpc-port`` is
  given. It refuses to start when the validation data path does not exist.
- ``pilot eval --checkpoint PATH --data DIR_OR_FILE [--tokenizer PATH]
  [--eval-tokens N] [--json]`` prints the checkpoint's validation BPB.
- ``pilot sample --checkpoint PATH --prompt TEXT [--tokens N --temperature T
  --top-k K --seed S]`` prints a generated continuation.

All three use the same ``Evaluator`` with the same defaults, so ``pilot eval``
reproduces what the worker stored for a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from pilot.cli.common import user_errors

if TYPE_CHECKING:
    from services.evaluator.evaluation import EvalSettings

Data = Annotated[Path, typer.Option(help="validation data: shard directory (last shard = validation) or text file")]
Checkpoint = Annotated[Path, typer.Option(help="checkpoint directory (or its checkpoint.json)")]
TokenizerOpt = Annotated[
    Optional[Path], typer.Option(help="tokenizer artifact; must match the checkpoint (default: <run_dir>/tokenizer)")
]
# Flags left out (None) take the EvalSettings defaults named in their help.
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N | mps (default: auto)")]
Threads = Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice)")]
Dtype = Annotated[Optional[str], typer.Option(help="autocast: auto (bf16 on CUDA) | float32 | bfloat16")]
EvalTokens = Annotated[
    Optional[int], typer.Option(help="validation tokens to score, a seeded sample (default: 65536; 0: the whole split)")
]
SeqLen = Annotated[Optional[int], typer.Option(help="targets per validation row (default: the model's context)")]
BatchTokens = Annotated[Optional[int], typer.Option(help="tokens per forward pass (default: 16384)")]
EvalSeed = Annotated[Optional[int], typer.Option(help="seed of the validation sample (default: 1337)")]
Prompt = Annotated[Optional[str], typer.Option(help="sample prompt; BOS is prepended (default: 'The ')")]
SampleTokens = Annotated[Optional[int], typer.Option(help="tokens in the text sample (0: none) (default: 64)")]
Temperature = Annotated[Optional[float], typer.Option(help="sampling temperature (0: greedy) (default: 0.8)")]
TopK = Annotated[Optional[int], typer.Option(help="sample from the k most likely tokens (0: all) (default: 50)")]
SampleSeed = Annotated[Optional[int], typer.Option(help="seed of the text sample (default: 42)")]


def _settings(flags: dict[str, Any]) -> EvalSettings:
    """EvalSettings from the flags that name one of its fields and were given (the rest keep defaults)."""
    from dataclasses import fields

    from services.evaluator.evaluation import EvalSettings

    names = {f.name for f in fields(EvalSettings)}
    given = {k: v for k, v in flags.items() if k in names and v is not None}
    if given.get("top_k") == 0:
        given["top_k"] = None
    return EvalSettings(**given)


def evaluator_command(
    data: Data,
    redis: Annotated[Optional[str], typer.Option("--redis", help="Redis URL (broker, results, events)",
                                                 envvar="PILOT_REDIS_URL", show_envvar=False)] = None,
    tokenizer: TokenizerOpt = None,
    device: Device = None,
    threads: Threads = None,
    dtype: Dtype = None,
    eval_tokens: EvalTokens = None,
    seq_len: SeqLen = None,
    batch_tokens: BatchTokens = None,
    eval_seed: EvalSeed = None,
    prompt: Prompt = None,
    sample_tokens: SampleTokens = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    sample_seed: SampleSeed = None,
    queue: Annotated[str, typer.Option(help="Celery queue to consume")] = "pilot.eval",
    concurrency: Annotated[int, typer.Option(help="jobs at once (one per device)")] = 1,
    grpc_port: Annotated[Optional[int], typer.Option(help="serve the Evaluator gRPC API on this port (0: any)")] = None,
    grpc_host: Annotated[str, typer.Option(help="address the gRPC API binds")] = "0.0.0.0",
    max_retries: Annotated[int, typer.Option(help="retries of a transient failure before it is recorded")] = 5,
    wandb: Annotated[bool, typer.Option("--wandb/--no-wandb", help="log results to wandb (offline by default)")] = True,
    wandb_project: Annotated[str, typer.Option(help="wandb project")] = "pilot",
    wandb_dir: Annotated[Optional[Path], typer.Option(help="wandb files (default: $PILOT_BASE_DIR/wandb)")] = None,
) -> None:
    """Run the evaluation worker: BPB, a text sample and wandb for every checkpoint job."""
    flags = dict(locals())
    with user_errors():
        from pilot.bus.connection import REDIS_URL_ENV
        from pilot.errors import ConfigError
        from pilot.log import configure
        from services.evaluator.tracking import WandbSettings
        from services.evaluator.worker import WorkerConfig, run_worker

        configure(service="evaluator")
        if not redis:
            raise ConfigError(f"no Redis URL: pass --redis redis://:PASSWORD@host:6379/0 or set ${REDIS_URL_ENV}")
        settings = _settings(flags)
        tracking = WandbSettings(enabled=wandb, project=wandb_project,
                                 **({"directory": wandb_dir} if wandb_dir is not None else {}))
        config = WorkerConfig(
            redis_url=redis, eval=settings, queue=queue, concurrency=concurrency, max_retries=max_retries,
            grpc_address=f"{grpc_host}:{grpc_port}" if grpc_port is not None else None, wandb=tracking,
        )
        run_worker(config)


def eval_command(
    checkpoint: Checkpoint,
    data: Data,
    tokenizer: TokenizerOpt = None,
    eval_tokens: EvalTokens = None,
    seq_len: SeqLen = None,
    batch_tokens: BatchTokens = None,
    eval_seed: EvalSeed = None,
    device: Device = None,
    threads: Threads = None,
    dtype: Dtype = None,
    prompt: Prompt = None,
    sample_tokens: SampleTokens = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Print a checkpoint's bits per byte on the validation split."""
    flags = dict(locals())
    with user_errors():
        from services.evaluator.evaluation import evaluate_checkpoint

        settings = _settings(flags)
        outcome = evaluate_checkpoint(checkpoint, settings)
    if as_json:
        typer.echo(json.dumps(outcome.to_dict(), indent=2))
        return
    scope = f"a seeded sample of {outcome.tokens:,} of {outcome.split_tokens:,}" if outcome.sampled else (
        f"all {outcome.tokens:,}")
    typer.echo(f"val bpb {outcome.bpb:.6f}  ({scope} validation tokens; round {outcome.round}, "
               f"{outcome.tokens_seen:,} training tokens; {outcome.eval_s:.1f} s on {outcome.device})")
    if outcome.sample:
        typer.echo(f"sample: {outcome.prompt}{outcome.sample}")


def sample_command(
    checkpoint: Checkpoint,
    prompt: Prompt = None,
    tokens: SampleTokens = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    seed: SampleSeed = None,
    tokenizer: TokenizerOpt = None,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Print text generated by a checkpoint's model after PROMPT."""
    flags = {**locals(), "sample_tokens": tokens, "sample_seed": seed}
    with user_errors():
        from services.evaluator.evaluation import Evaluator

        settings = _settings(flags)
        evaluator = Evaluator(settings)
        text = evaluator.sample(evaluator.load(checkpoint))
    typer.echo(settings.prompt + text)


def register(app: typer.Typer) -> None:
    """Add `evaluator`, `eval` and `sample` to the main `pilot` app."""
    app.command("evaluator")(evaluator_command)
    app.command("eval")(eval_command)
    app.command("sample")(sample_command)
