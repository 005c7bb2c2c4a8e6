"""`pilot tokenizer` commands: train a BPE tokenizer, inspect it, encode with it.

- ``pilot tokenizer train --input FILE_OR_DIR --vocab-size N [--max-chars N]
  [--doc-cap N] [--eval-input FILE_OR_DIR] [--out DIR]`` trains with the Rust
  trainer (``pilot.bpe``), saves the artifact (default
  ``$PILOT_BASE_DIR/tokenizer``) and prints the time taken, bytes per token on
  held-out text (``--eval-input``, else the last input file when there are
  several, else the last 1 % of the only one), and the same measure for GPT-2
  and cl100k_base when tiktoken already has them cached (never downloads).
- ``pilot tokenizer info DIR`` describes an artifact.
- ``pilot tokenizer encode DIR TEXT`` prints the ids and the piece of each.

Library errors (``PilotError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pilot.errors import PilotError

if TYPE_CHECKING:
    from pilot.bpe import BPETokenizer

tokenizer_app = typer.Typer(help="BPE tokenizer: train (Rust), inspect, encode.", no_args_is_help=True)

# tiktoken's reference encodings and the files each one downloads.
_REFERENCE_FILES = {
    "gpt2": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    ),
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",),
}
EVAL_MAX_BYTES = 4 << 20


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except PilotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


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

    with _user_errors():
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

    with _user_errors():
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

    with _user_errors():
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


def register(app: typer.Typer) -> None:
    """Add `pilot tokenizer ...` to the main app."""
    app.add_typer(tokenizer_app, name="tokenizer")
