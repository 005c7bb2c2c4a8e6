"""Byte-level BPE: training with the Rust ``pilot_rustbpe`` crate, encoding with tiktoken.

- ``train_bpe(texts_or_files, vocab_size, ...)`` learns merges from an iterable
  of documents (``str``, streamed), or from files (``Path`` / ``TextSource``):
  text files are read by Rust block by block (a file is one document); parquet
  files are read in record batches whose Arrow ``text`` buffers go to Rust
  as they are, so no Python object is made per document. Directories expand
  to their ``*.txt`` and ``*.parquet`` files.
- ``BPETokenizer`` implements ``pilot.tokenizer.Tokenizer``: the mergeable
  ranks and split pattern are loaded into a ``tiktoken.Encoding``; nanochat's
  nine special tokens follow the ranks (``vocab_size`` counts them).
- Artifact: ``<dir>/tokenizer.json`` = {"kind": "bpe", "version": 1, "pattern",
  "vocab_size", "special_tokens": {name: id}, "mergeable_ranks":
  ["<base64 bytes> <rank>", ...], "sha256"}, written atomically and verified on
  load (``pilot.tokenizer.write_artifact`` / ``read_artifact``).
- ``discover`` / ``holdout_split`` pick training files and held-out text.

Every failure (bad vocab size, empty corpus, bad pattern, unreadable or
non-UTF-8 file, tampered artifact) raises ``TokenizerError`` naming the culprit.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pilot_rustbpe
import tiktoken

from pilot.errors import TokenizerError
from pilot.log import get_logger
from pilot.tokenizer import BOS, DEFAULT_THREADS, NANOCHAT_SPECIALS, canonical_sha256, read_artifact, write_artifact

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import torch

log = get_logger(__name__)

GPT4_SPLIT: str = pilot_rustbpe.GPT4_PATTERN
"""GPT-4's split pattern with numbers in groups of 1-2 digits (nanochat's)."""

PARQUET_SUFFIX = ".parquet"
TEXT_SUFFIX = ".txt"
PARQUET_BATCH_ROWS = 1024  # ~4 MB of FineWeb text per batch handed to Rust

ProgressCallback = Callable[[str, int, "int | None"], object]
"""``progress(phase, done, total)`` as training advances (``total`` is None when unknown)."""


@dataclass(frozen=True)
class TextSource:
    """A text or parquet file to train on; ``stop`` keeps only its first
    ``stop`` bytes (text file) or rows (parquet file)."""

    path: Path
    stop: int | None = None

    @property
    def is_parquet(self) -> bool:
        return self.path.suffix == PARQUET_SUFFIX


# --- training -----------------------------------------------------------------


def train_bpe(
    texts_or_files: Iterable[str] | TextSource | os.PathLike[str] | Iterable[TextSource | os.PathLike[str]],
    vocab_size: int,
    *,
    pattern: str = GPT4_SPLIT,
    max_chars: int | None = None,
    doc_cap: int | None = None,
    progress: bool | ProgressCallback = True,
    threads: int | None = None,
) -> BPETokenizer:
    """Train a BPE tokenizer with ``vocab_size`` ids, the 9 special tokens included.

    ``texts_or_files``: documents (an iterable of ``str``), or a ``Path`` /
    ``TextSource`` / iterable of them (directories expand, see ``discover``).
    ``doc_cap`` keeps the first N characters of each document (a text file is
    one document); ``max_chars`` stops after N characters in total.
    ``progress``: True for a rich bar on stderr, or a :data:`ProgressCallback`
    (e.g. a service publishing progress); what it raises aborts training.
    """
    n_specials = len(NANOCHAT_SPECIALS)
    if vocab_size < 256 + n_specials:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: need at least {256 + n_specials} "
            f"(256 byte tokens + {n_specials} special tokens)"
        )
    for option, value in (("max_chars", max_chars), ("doc_cap", doc_cap)):
        if value is not None and value <= 0:
            raise TokenizerError(f"{option} must be positive, got {value}")
    with rust_errors():
        trainer = pilot_rustbpe.Trainer(pattern, doc_cap=doc_cap, max_chars=max_chars, threads=threads)
    sources = _as_sources(texts_or_files)
    with _Progress(enabled=progress) as bar:
        if isinstance(sources, list):
            _feed_sources(trainer, sources, bar)
        else:
            bar.start("reading documents", total=None)
            with rust_errors():
                trainer.feed(sources, progress=bar.callback(lambda n: n))
        if trainer.bytes == 0:
            raise TokenizerError("empty corpus: no text to train the tokenizer on")
        base_vocab = vocab_size - n_specials
        bar.start("learning merges", total=base_vocab - 256)
        with rust_errors():
            ranks = trainer.train(base_vocab, progress=bar.callback(lambda done, _total: done))
    if len(ranks) < base_vocab:
        log.warning("corpus too small for the vocab size", requested=vocab_size, got=len(ranks) + n_specials)
    log.info("trained BPE tokenizer", vocab_size=len(ranks) + n_specials, docs=trainer.docs, bytes=trainer.bytes)
    return BPETokenizer(dict(ranks), pattern)


def _as_sources(items: object) -> list[TextSource] | Iterator[str]:
    """The argument of ``train_bpe`` as a list of files or a stream of documents."""
    if isinstance(items, (str, bytes)):
        raise TokenizerError("pass documents as an iterable of str, or files as Path objects (got a bare str)")
    if isinstance(items, (TextSource, os.PathLike)):
        items = [items]
    if not isinstance(items, Iterable):
        raise TokenizerError(f"cannot train on a {type(items).__name__}: pass documents or paths")
    iterator = iter(items)
    try:
        first = next(iterator)
    except StopIteration:
        raise TokenizerError("empty corpus: no documents or files given") from None
    if isinstance(first, (TextSource, os.PathLike)):
        paths = [first, *iterator]
        return [s for p in paths for s in ([p] if isinstance(p, TextSource) else map(TextSource, discover([p])))]

    def documents() -> Iterator[str]:
        yield first
        yield from iterator

    return documents()


def discover(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files named, each directory replaced by its ``*.txt`` and ``*.parquet``
    files (sorted by name, not recursive)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (TEXT_SUFFIX, PARQUET_SUFFIX))
            if not found:
                raise TokenizerError(f"no .txt or .parquet files in directory {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise TokenizerError(f"training input {path} does not exist")
    return files


def holdout_split(
    files: Sequence[Path], *, fraction: float = 0.01, max_eval_bytes: int = 4 << 20
) -> tuple[list[TextSource], str]:
    """Training sources and held-out text (at most ``max_eval_bytes``).

    With several files the last one is held out (FineWeb layout: the last
    shard is validation); a single file keeps its last ``fraction`` for eval.
    """
    if not files:
        raise TokenizerError("no training files given")
    if len(files) > 1:
        return [TextSource(f) for f in files[:-1]], read_text(TextSource(files[-1]), max_eval_bytes)
    only = TextSource(files[0])
    if only.is_parquet:
        rows = _parquet_rows(only.path)
        cut = rows - max(1, int(rows * fraction))
        if cut <= 0:
            raise TokenizerError(f"{only.path} has {rows} row(s): too few to hold some out; pass --eval-input")
        eval_text = "\n".join(_parquet_texts(only.path, skip=cut, limit_bytes=max_eval_bytes))
        return [TextSource(only.path, stop=cut)], eval_text[:max_eval_bytes]
    size = only.path.stat().st_size
    cut = _line_start_near(only.path, size - max(1, int(size * fraction)))
    if cut <= 0:
        raise TokenizerError(f"{only.path} is too small to hold some of it out; pass --eval-input")
    with open(only.path, "rb") as handle:
        handle.seek(cut)
        tail = handle.read(max_eval_bytes)
    return [TextSource(only.path, stop=cut)], _decode(tail, only.path, cut)


def read_text(source: TextSource, max_bytes: int) -> str:
    """Up to ``max_bytes`` of a text file, or of a parquet file's documents."""
    if source.is_parquet:
        return "\n".join(_parquet_texts(source.path, limit_bytes=max_bytes))[:max_bytes]
    with open(source.path, "rb") as handle:
        return _decode(handle.read(max_bytes), source.path, 0)


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(raw) - 3 and exc.reason == "unexpected end of data":
            return raw[: exc.start].decode("utf-8")  # cut inside the last character
        raise TokenizerError(f"{path}: invalid UTF-8 at byte offset {offset + exc.start}") from None


def _line_start_near(path: Path, position: int) -> int:
    """The offset just after the first newline at or after ``position`` (or
    ``position`` moved onto a character boundary when there is none)."""
    with open(path, "rb") as handle:
        handle.seek(max(position, 0))
        window = handle.read(1 << 16)
    newline = window.find(b"\n")
    if newline >= 0:
        return max(position, 0) + newline + 1
    skip = next((i for i, b in enumerate(window) if b & 0xC0 != 0x80), 0)
    return max(position, 0) + skip


def _feed_sources(trainer: pilot_rustbpe.Trainer, sources: Sequence[TextSource], bar: _Progress) -> None:
    sizes = [_source_size(s) for s in sources]
    bar.start("reading files", total=sum(sizes))
    done = 0
    for source, size in zip(sources, sizes, strict=True):
        if trainer.full:
            break
        if source.is_parquet:
            feed_parquet(
                trainer, source, bar.callback(lambda fraction, base=done, size=size: base + int(fraction * size))
            )
        else:
            with rust_errors():
                trainer.feed_file(
                    str(source.path), stop=source.stop, progress=bar.callback(lambda _path, n, base=done: base + n)
                )
        done += size
        bar.advance_to(done)


def _source_size(source: TextSource) -> int:
    try:
        size = source.path.stat().st_size
    except OSError as exc:
        raise TokenizerError(f"cannot read training input {source.path}: {exc.strerror}") from None
    return min(size, source.stop) if source.stop is not None and not source.is_parquet else size


def feed_parquet(
    trainer: pilot_rustbpe.Trainer, source: TextSource, on_fraction: Callable[[float], object] | None = None
) -> None:
    """Feed a parquet file's ``text`` column batch by batch, as Arrow buffers
    (no Python object per document); ``on_fraction(rows done / rows wanted)``."""
    for column, rows_done, rows_wanted in _parquet_columns(source.path, stop=source.stop):
        offsets, data = _arrow_string_buffers(column, source.path)
        try:
            trainer.feed_arrow(offsets, data)
        except ValueError as exc:
            raise TokenizerError(f"{source.path}: rows {rows_done - len(column)}..{rows_done}: {exc}") from None
        if on_fraction is not None:
            on_fraction(rows_done / max(rows_wanted, 1))
        if trainer.full:
            break


def _parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read parquet file {path}: {exc}") from None
    if "text" not in file.schema_arrow.names:
        raise TokenizerError(f"parquet file {path} has no 'text' column (columns: {file.schema_arrow.names})")
    return file


def _parquet_rows(path: Path) -> int:
    return int(_parquet_file(path).metadata.num_rows)


def _parquet_columns(path: Path, *, stop: int | None = None, skip: int = 0) -> Iterator[tuple[pa.Array, int, int]]:
    """``text`` column batches of rows ``skip..stop``, with rows read so far
    (counting from ``skip``) and the number of rows wanted."""
    file = _parquet_file(path)
    total = int(file.metadata.num_rows)
    end = total if stop is None else min(stop, total)
    wanted, seen, done = max(end - skip, 0), 0, 0
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
        lo, hi = max(skip - seen, 0), min(end - seen, batch.num_rows)
        seen += batch.num_rows
        if hi > lo:
            done += hi - lo
            yield batch.column(0).slice(lo, hi - lo), done, wanted
        if seen >= end:
            break


def _parquet_texts(path: Path, *, skip: int = 0, limit_bytes: int | None = None) -> list[str]:
    texts: list[str] = []
    size = 0
    for column, _, _ in _parquet_columns(path, skip=skip):
        for text in column.to_pylist():
            texts.append(text or "")
            size += len(texts[-1])
            if limit_bytes is not None and size >= limit_bytes:
                return texts
    return texts


def _arrow_string_buffers(column: pa.Array, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) numpy views of a string column; nulls become ''."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        column = pc.fill_null(column, "")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        try:
            column = column.cast(pa.large_string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise TokenizerError(f"parquet file {path}: 'text' column has type {column.type}: {exc}") from None
    width = np.dtype(np.int32 if pa.types.is_string(column.type) else np.int64)
    _validity, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=width, count=len(column) + 1, offset=column.offset * width.itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return offsets, data


@contextlib.contextmanager
def rust_errors() -> Iterator[None]:
    """Turn the Rust extension's ValueError / OSError / TypeError into TokenizerError."""
    try:
        yield
    except TokenizerError:
        raise
    except (ValueError, OSError, TypeError) as exc:
        raise TokenizerError(str(exc)) from None


class _Progress:
    """A rich progress bar on stderr, or a ProgressCallback, one phase at a time
    (a no-op when disabled)."""

    def __init__(self, *, enabled: bool | ProgressCallback) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._notify: ProgressCallback | None = enabled if callable(enabled) else None
        self._phase: tuple[str, int | None] = ("", None)
        if enabled is True:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._bar = Progress(*columns, console=Console(stderr=True))

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, description: str, *, total: int | None) -> None:
        if self._bar is not None:
            self._task = self._bar.add_task(description, total=total)
        self._phase = (description, total)
        if self._notify is not None:
            self._notify(description, 0, total)

    def advance_to(self, completed: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=completed)
        if self._notify is not None:
            self._notify(self._phase[0], completed, self._phase[1])

    def callback(self, position: Callable[..., int]) -> Callable[..., None] | None:
        """A callback for Rust that maps its arguments to the bar position."""
        if self._bar is None and self._notify is None:
            return None
        return lambda *args: self.advance_to(position(*args))


# --- the tokenizer ------------------------------------------------------------


class BPETokenizer:
    """A trained byte-level BPE: tiktoken encoding, nanochat specials after the ranks."""

    KIND = "bpe"
    VERSION = 1

    def __init__(
        self, mergeable_ranks: Mapping[bytes, int], pattern: str, specials: Sequence[str] = NANOCHAT_SPECIALS
    ) -> None:
        ranks = dict(mergeable_ranks)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise TokenizerError("mergeable ranks must be 0..n-1, each used once")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"mergeable ranks lack single byte {missing[0]}: every byte needs a token")
        if not specials or specials[0] != BOS or len(set(specials)) != len(specials):
            raise TokenizerError(f"special tokens must be unique and start with {BOS}")
        self.pattern = pattern
        self.mergeable_ranks = ranks
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(specials)}
        self.vocab_size = len(ranks) + len(specials)
        self.bos_id = self.special_tokens[BOS]
        self.name = f"bpe{self.vocab_size}"
        self.sha256 = canonical_sha256(self._artifact())
        try:
            self._enc = tiktoken.Encoding(
                name=f"pilot-{self.name}-{self.sha256[:12]}",
                pat_str=pattern,
                mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
            )
        except ValueError as exc:
            raise TokenizerError(f"split pattern {pattern!r} does not compile: {exc}") from None

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"

    def encode(self, text: str) -> list[int]:
        """Token ids; no BOS is added and special-token text is plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = DEFAULT_THREADS) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 across token cuts becomes U+FFFD)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is outside {self.name}'s vocabulary (0..{self.vocab_size - 1})")
        return self._enc.decode(ids, errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes one id stands for (a special token's own text)."""
        try:
            return self._enc.decode_single_token_bytes(token)
        except KeyError:
            raise TokenizerError(f"token id {token} is outside {self.name}'s vocabulary") from None

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 bytes per id, 0 for special tokens."""
        import torch

        lengths = torch.zeros(self.vocab_size, dtype=torch.int64)
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        lengths[: len(by_rank)] = torch.tensor([len(b) for b, _ in by_rank], dtype=torch.int64)
        return lengths

    def _artifact(self) -> dict[str, Any]:
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return {
            "kind": self.KIND,
            "version": self.VERSION,
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "special_tokens": dict(self.special_tokens),
            "mergeable_ranks": [f"{base64.b64encode(b).decode('ascii')} {rank}" for b, rank in by_rank],
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path."""
        return write_artifact(directory, self._artifact())

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Load an artifact directory (or its tokenizer.json), verifying its sha256."""
        obj = read_artifact(path)
        where = f"tokenizer artifact {path}"
        if obj.get("kind") != cls.KIND or obj.get("version") != cls.VERSION:
            raise TokenizerError(
                f"{where} is kind {obj.get('kind')!r} version {obj.get('version')!r}, expected bpe version 1"
            )
        try:
            ranks: dict[bytes, int] = {}
            for line in obj["mergeable_ranks"]:
                token, rank = line.split(" ")
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            specials = sorted(obj["special_tokens"], key=lambda name: obj["special_tokens"][name])
            tokenizer = cls(ranks, str(obj["pattern"]), specials)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise TokenizerError(f"{where} is malformed: {type(exc).__name__}: {exc}") from None
        if tokenizer.sha256 != obj["sha256"] or tokenizer.vocab_size != obj.get("vocab_size"):
            raise TokenizerError(f"{where} is inconsistent: its fields do not rebuild the recorded tokenizer")
        if tokenizer.special_tokens != obj["special_tokens"]:
            raise TokenizerError(f"{where}: special token ids must follow the mergeable ranks")
        return tokenizer
