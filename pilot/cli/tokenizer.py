"""`pilot tokenizer` commands: train a BPE tokenizer, inspect it, encode with it, serve it.

- ``pilot tokenizer train --input FILE_OR_DIR --vocab-size N [--max-chars N]
  [--doc-cap N] [--eval-input FILE_OR_DIR] [--out DIR]`` trains with the Rust
  trainer (``pilot.bpe``), saves the artifact (default
  ``$PILOT_BASE_DIR/tokenizer``) and prints the time taken, bytes per token on
  held-out text (``--eval-input``, else the last input file when there are
  several, else the last 1 % of the only one), and the same measure for GPT-2
  and cl100k_base when tiktoken already has them cached (never downloads).
- ``pilot tokenizer info DIR`` describes an artifact.
- ``pilot tokenizer encode DIR TEXT`` prints the ids and the piece of each.
- ``pilot tokenizer serve --artifact DIR [--host 0.0.0.0] [--port 50052]`` serves
  the Tokenizer gRPC service (artifact, encode, decode; plus health) until
  SIGTERM / Ctrl-C (services/tokenizer/grpc_server.py).
- ``pilot tokenizer worker --redis URL [--out-dir DIR]`` runs the Celery worker
  that trains tokenizers on the ``pilot.tokenizer`` queue (services/tokenizer/worker.py).
- ``pilot tokenizer submit --redis URL --input PATH --vocab-size N --out DIR
  [--wait]`` enqueues a training job (its id is derived from the job, so a
  job that already succeeded is not trained again) and with ``--wait`` follows
  its progress with a progress bar until it is ok or failed.
- ``pilot tokenizer fetch --address HOST:PORT --cache-dir DIR`` copies the served
  artifact into a verified local cache (pilot/tokenizer_client.py).

Library errors (``PilotError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pilot.cli.common import user_errors

if TYPE_CHECKING:
    from pilot.bpe import BPETokenizer
    from services.tokenizer.status import JobStatus, JobStatusStore

tokenizer_app = typer.Typer(
    help="BPE tokenizer: train (Rust), inspect, encode; serve over gRPC; train as a queued job.", no_args_is_help=True
)

# tiktoken's reference encodings and the files each one downloads.
_REFERENCE_FILES = {
    "gpt2": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    ),
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",),
}
EVAL_MAX_BYTES = 4 << 20


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 20):.1f} MiB"


def cached_reference_encodings() -> list[str]:
    """The tiktoken reference encodings usable offline (all files in its cache)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return []
    cached = []
    for name, urls in _REFERENCE_FILES.items():
        keys = (hashlib.sha1(url.encode()).hexdigest() for url in urls)
        if all(os.path.isfile(os.path.join(cache_dir, key)) for key in keys):
            cached.append(name)
    return cached


def bytes_per_token(tokenizer: BPETokenizer, text: str) -> float:
    ids = tokenizer.encode(text)
    return len(text.encode("utf-8")) / max(len(ids), 1)


@tokenizer_app.command("train")
def train_command(
    inputs: Annotated[list[Path], typer.Option("--input", help="text/parquet file or directory of them (repeatable)")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="vocabulary size, 9 special tokens included")],
    max_chars: Annotated[int | None, typer.Option("--max-chars", help="stop after this many characters")] = None,
    doc_cap: Annotated[int | None, typer.Option("--doc-cap", help="keep this many characters per document")] = None,
    eval_input: Annotated[
        Path | None, typer.Option("--eval-input", help="held-out text for bytes/token (file or directory)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="artifact directory (default $PILOT_BASE_DIR/tokenizer)")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")] = True,
) -> None:
    """Train a BPE tokenizer with the Rust trainer and save its artifact."""
    from pilot.bpe import TextSource, discover, holdout_split, read_text, train_bpe
    from pilot.paths import tokenizer_dir

    with user_errors():
        files = discover(inputs)
        if eval_input is not None:
            sources = [TextSource(f) for f in files]
            eval_text = "".join(read_text(TextSource(f), EVAL_MAX_BYTES) for f in discover([eval_input]))
            eval_name = str(eval_input)
        else:
            sources, eval_text = holdout_split(files)
            eval_name = "held-out tail of the input"
        started = time.perf_counter()
        tokenizer = train_bpe(sources, vocab_size, max_chars=max_chars, doc_cap=doc_cap, progress=progress)
        seconds = time.perf_counter() - started
        path = tokenizer.save(out if out is not None else tokenizer_dir())
    typer.echo(f"trained {tokenizer.name} in {seconds:.2f} s; saved {path} (sha256 {tokenizer.sha256[:16]})")
    if not eval_text:
        typer.echo("no held-out text to evaluate on")
        return
    ours = bytes_per_token(tokenizer, eval_text)
    typer.echo(f"bytes/token on {_mib(len(eval_text.encode('utf-8')))} of {eval_name}: {ours:.3f}")
    import tiktoken

    for name in cached_reference_encodings():
        reference = tiktoken.get_encoding(name)
        theirs = len(eval_text.encode("utf-8")) / max(len(reference.encode_ordinary(eval_text)), 1)
        typer.echo(f"  {name} (vocab {reference.n_vocab}): {theirs:.3f} bytes/token; ours is {ours / theirs:.2f}x")


@tokenizer_app.command("info")
def info_command(directory: Annotated[Path, typer.Argument(help="tokenizer artifact directory")]) -> None:
    """Describe a tokenizer artifact."""
    from pilot.bpe import BPETokenizer

    with user_errors():
        tokenizer = BPETokenizer.load(directory)
    ranks = tokenizer.mergeable_ranks
    longest = sorted(ranks, key=len, reverse=True)[:5]
    typer.echo(f"name:           {tokenizer.name}")
    typer.echo(
        f"vocab size:     {tokenizer.vocab_size} ({len(ranks)} byte-level + {len(tokenizer.special_tokens)} special)"
    )
    typer.echo(f"merges:         {len(ranks) - 256}")
    typer.echo(f"bos id:         {tokenizer.bos_id}")
    typer.echo(f"special tokens: {', '.join(f'{k}={v}' for k, v in tokenizer.special_tokens.items())}")
    typer.echo(f"pattern:        {tokenizer.pattern}")
    typer.echo(f"sha256:         {tokenizer.sha256}")
    typer.echo(f"longest tokens: {', '.join(repr(t.decode('utf-8', errors='replace')) for t in longest)}")


@tokenizer_app.command("encode")
def encode_command(
    directory: Annotated[Path, typer.Argument(help="tokenizer artifact directory")],
    text: Annotated[str, typer.Argument(help="text to encode")],
) -> None:
    """Print the token ids of TEXT and the piece each id stands for."""
    from pilot.bpe import BPETokenizer

    with user_errors():
        tokenizer = BPETokenizer.load(directory)
        ids = tokenizer.encode(text)
        pieces = [_show_piece(tokenizer.piece(i)) for i in ids]
    typer.echo(f"{len(ids)} tokens: {ids}")
    typer.echo(" | ".join(pieces))


def _show_piece(piece: bytes) -> str:
    """A token's text with escapes, or its bytes when it is part of a character."""
    try:
        return repr(piece.decode("utf-8"))[1:-1]
    except UnicodeDecodeError:
        return repr(piece)


# --- the service: serve, worker, submit, fetch ---------------------------------------------

RedisUrl = Annotated[str | None, typer.Option("--redis", help="Redis URL (broker and job status)",
                                                envvar="PILOT_REDIS_URL", show_envvar=False)]


def _require_redis(url: str | None) -> str:
    from pilot.bus.connection import REDIS_URL_ENV
    from pilot.errors import ConfigError

    if not url:
        raise ConfigError(f"no Redis URL: pass --redis redis://:PASSWORD@host:6379/0 or set ${REDIS_URL_ENV}")
    return url


@tokenizer_app.command("serve")
def serve_command(
    artifact: Annotated[Path, typer.Option("--artifact", help="tokenizer artifact directory to serve")],
    host: Annotated[str, typer.Option(help="address to bind")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="port to bind (0: any free port)")] = 50052,
) -> None:
    """Serve the Tokenizer gRPC service (artifact, encode, decode, health) until SIGTERM / Ctrl-C."""
    with user_errors():
        from pilot.grpc_util import serve_until_signal
        from pilot.log import configure
        from services.tokenizer.grpc_server import ServedArtifact, serve_tokenizer

        configure(service="tokenizer")
        served = ServedArtifact.load(artifact)
        server = serve_tokenizer(served, f"{host}:{port}")
    typer.echo(f"serving tokenizer {served.tokenizer.name} (artifact sha256 {served.sha256[:16]}) "
               f"on {host}:{server.port}")
    serve_until_signal(server)


@tokenizer_app.command("worker")
def worker_command(
    redis: RedisUrl = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", help="where relative or empty job outputs go (default $PILOT_BASE_DIR/tokenizer)")] = None,
    queue: Annotated[str, typer.Option(help="Celery queue to consume")] = "pilot.tokenizer",
    threads: Annotated[int | None, typer.Option(help="trainer threads (default: all cores)")] = None,
    max_retries: Annotated[int, typer.Option(help="retries while Redis is unreachable")] = 3,
) -> None:
    """Run the worker that trains tokenizers from the job queue."""
    with user_errors():
        from pilot.log import configure
        from services.tokenizer.worker import WorkerConfig, run_worker

        configure(service="tokenizer")
        config = WorkerConfig(redis_url=_require_redis(redis), queue=queue, threads=threads,
                              max_retries=max_retries,
                              **({"out_dir": out_dir.expanduser().resolve()} if out_dir is not None else {}))
        run_worker(config)


@tokenizer_app.command("submit")
def submit_command(
    input: Annotated[str, typer.Option("--input", help="text/parquet file or directory, as the worker sees it")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="vocabulary size, 9 special tokens included")],
    out: Annotated[str, typer.Option("--out", help="artifact directory, as the worker sees it")],
    redis: RedisUrl = None,
    max_chars: Annotated[int, typer.Option("--max-chars", help="stop after this many characters (0: all)")] = 0,
    doc_cap: Annotated[int, typer.Option("--doc-cap", help="characters kept per document (0: all)")] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job until it is ok or failed")] = False,
    timeout: Annotated[float | None, typer.Option(help="with --wait: give up after this many seconds")] = None,
    force: Annotated[bool, typer.Option("--force", help="train again even if this job already succeeded")] = False,
    queue: Annotated[str, typer.Option(help="Celery queue")] = "pilot.tokenizer",
    local_paths: Annotated[bool, typer.Option(
        "--local-paths/--as-given", help="make relative paths absolute here (default) or send them as given")] = True,
) -> None:
    """Enqueue a tokenizer training job; with --wait, show its progress and outcome."""
    with user_errors():
        from pilot.bus import redis_client
        from pilot.errors import ConfigError, TokenizerError
        from pilot.jobs import make_celery
        from pilot.v1.jobs_pb2 import TrainTokenizerJob
        from services.tokenizer.queue import enqueue_training
        from services.tokenizer.status import JobStatusStore

        if vocab_size <= 0 or max_chars < 0 or doc_cap < 0:
            raise ConfigError("--vocab-size must be positive; --max-chars and --doc-cap must be >= 0")
        absolute = (lambda p: str(Path(p).expanduser().resolve())) if local_paths else str
        job = TrainTokenizerJob(input=absolute(input), vocab_size=vocab_size, max_chars=max_chars,
                                doc_cap=doc_cap, out=absolute(out))
        url = _require_redis(redis)
        client = redis_client(url)
        app = make_celery("pilot.tokenizer.submit", url)
        try:
            submission = enqueue_training(app, client, job, queue=queue, force=force)
            store = JobStatusStore(client)
            if submission.already_done:
                typer.echo(f"job {submission.job_id} already succeeded (use --force to train again)")
                status = store.get(submission.job_id)
            else:
                typer.echo(f"submitted job {submission.job_id} (vocab {vocab_size}, input {job.input})")
                if not wait:
                    return
                status = _follow(store, submission.job_id, timeout)
        finally:
            app.close()
            client.close()
        if status is None or not status.ok:
            raise TokenizerError(f"job {submission.job_id} failed: {status.reason if status else 'no status'}")
    typer.echo(f"trained vocab {status.vocab_size} in {status.elapsed_s:.2f} s: {status.out} "
               f"(sha256 {status.sha256})")


def _follow(store: JobStatusStore, job_id: str, timeout_s: float | None) -> JobStatus:
    """Wait for the job, drawing its phase and percent as a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("queued", total=100)

        def show(status: JobStatus) -> None:
            bar.update(task, description=status.phase or status.state, completed=status.percent)

        return store.wait(job_id, timeout_s=timeout_s, on_update=show)


@tokenizer_app.command("fetch")
def fetch_command(
    address: Annotated[str, typer.Option("--address", help="Tokenizer service host:port",
                                         envvar="PILOT_TOKENIZER_ADDRESS", show_envvar=False)],
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="local cache (default $PILOT_BASE_DIR/tokenizer/cache)")] = None,
    sha256: Annotated[str | None, typer.Option(help="expected sha256 of the artifact file")] = None,
    name: Annotated[str, typer.Option(help="served tokenizer name (default: the server's)")] = "",
) -> None:
    """Copy the served tokenizer into a verified local cache and print its directory."""
    with user_errors():
        from pilot.grpc_util import TLSConfig
        from pilot.paths import tokenizer_dir
        from pilot.tokenizer_client import fetch_tokenizer

        directory = fetch_tokenizer(address, sha256=sha256, name=name, tls=TLSConfig.from_env(),
                                    cache_dir=cache_dir if cache_dir is not None else tokenizer_dir() / "cache")
    typer.echo(str(directory))


def register(app: typer.Typer) -> None:
    """Add `pilot tokenizer ...` to the main app."""
    app.add_typer(tokenizer_app, name="tokenizer")
