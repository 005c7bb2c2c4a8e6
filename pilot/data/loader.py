"""Streaming token batches from shards: the resumable loader and work-unit batches.

The token stream. Training documents are read in a fixed order — training
shards, then row groups, then rows; with ``seed`` set, the order of row groups
is a fresh seeded permutation each epoch — and each document becomes
``[BOS] + tokenizer.encode(text)`` (encoded ``tokenizer_batch`` documents at a
time with ``encode_batch``). The documents' tokens form one endless stream
(epoch after epoch). A batch is a window of ``B·T + 1`` consecutive tokens:
``inputs = window[:-1]`` and ``targets = window[1:]``, each reshaped to (B, T);
the next batch starts ``B·T`` tokens later, so every token after the first is a
target exactly once and no buffer remainder is ever dropped.

The cursor. ``loader.cursor`` is a ``LoaderCursor`` naming the first token of
the NEXT batch as (epoch, shard_index, row_group, row_offset) of its document
plus ``token_offset`` inside that document's tokens (BOS is offset 0). A loader
built with that cursor re-reads that document, skips ``token_offset`` tokens and
yields exactly what the uninterrupted loader would have yielded. It is a dict
of ints (``to_dict``/``from_dict``) for checkpoint metadata, and it does not
depend on batch size or sequence length, so a run may resume with other ones.

DDP. Every rank reads the same stream; a step consumes ``world_size`` windows
and rank r takes the r-th. ``cursor`` is therefore the same on every rank (the
start of the next step), so saving rank 0's cursor is enough, and a run may
resume on a different number of ranks. The price is that every rank tokenizes
the whole stream; for the byte/char/tiktoken tokenizers this is cheap next to
a training step.

Work units. The federated trainer trains on leased row groups instead:
``iter_unit_batches`` yields the batches of one ``(shard, row_group)`` with the
token offset where the next step begins, so a half-done unit can be resumed.
A unit's last batch is padded: inputs with BOS, targets with ``IGNORE_INDEX``
(-1; the model's cross-entropy must ignore it), and ``num_tokens`` counts the
real targets, so no token of a unit is skipped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import numpy as np
import pyarrow.parquet as pq

from pilot.data.shards import WorkUnit, list_shards, open_shard, read_row_group, work_units
from pilot.errors import DataError
from pilot.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -1  # target value the loss must skip (padding)
DEFAULT_TOKENIZER_BATCH = 128  # documents per encode_batch call

P = TypeVar("P")


@dataclass(frozen=True)
class LoaderCursor:
    """Where the next batch begins (see the module docstring)."""

    shard_index: int = 0  # index into the training shard list
    row_group: int = 0
    row_offset: int = 0  # row (document) inside the row group
    token_offset: int = 0  # token inside that document's [BOS] + tokens
    epoch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoaderCursor:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise DataError(f"loader cursor has unknown keys {unknown}")
        values: dict[str, int] = {}
        for name in names:
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"loader cursor field {name!r} must be a non-negative int, got {value!r}")
            values[name] = value
        return cls(**values)


def tokenize_documents(
    docs: Iterable[tuple[P, str]], tokenizer: Tokenizer, batch: int = DEFAULT_TOKENIZER_BATCH
) -> Iterator[tuple[P, np.ndarray]]:
    """``(position, [BOS] + encode(text))`` per document, encoding ``batch`` at a time."""
    if batch < 1:
        raise DataError(f"tokenizer batch must be >= 1, got {batch}")
    source = iter(docs)
    bos = tokenizer.bos_id
    while chunk := list(islice(source, batch)):
        encoded = tokenizer.encode_batch([text for _, text in chunk])
        for (position, _), ids in zip(chunk, encoded, strict=True):
            tokens = np.empty(len(ids) + 1, dtype=np.int64)
            tokens[0] = bos
            tokens[1:] = ids
            yield position, tokens


class TokenStream(Generic[P]):
    """A stream of tokenized documents read through a moving head.

    ``window(n)`` shows the next ``n`` tokens without consuming them,
    ``advance(n)`` consumes, and ``head()`` says which document (and which
    token of it) the head is on. Only the documents under the window are kept.
    """

    def __init__(self, docs: Iterator[tuple[P, np.ndarray]], head_offset: int = 0) -> None:
        self._docs = docs
        self._pending: deque[tuple[P, np.ndarray]] = deque()
        self._offset = head_offset  # into the first pending document
        self._available = -head_offset  # tokens from the head to the end of the pending documents
        self._exhausted = False

    def _fill(self, n: int) -> None:
        while self._available < n and not self._exhausted:
            try:
                position, tokens = next(self._docs)
            except StopIteration:
                self._exhausted = True
                break
            if not self._pending and self._offset and self._offset >= len(tokens):
                raise DataError(
                    f"token offset {self._offset} is past the end of document {position} ({len(tokens)} tokens)"
                )
            self._pending.append((position, tokens))
            self._available += len(tokens)

    def head(self) -> tuple[P, int] | None:
        """(document position, token offset) of the next token, or None at the end."""
        self._fill(1)
        while self._pending and self._offset >= len(self._pending[0][1]):  # empty documents
            self._pending.popleft()
            self._offset = 0
            self._fill(1)
        if not self._pending:
            return None
        return self._pending[0][0], self._offset

    def window(self, n: int) -> np.ndarray:
        """The next ``n`` tokens (fewer only at the end of the stream), not consumed."""
        self._fill(n)
        pieces: list[np.ndarray] = []
        need, offset = n, self._offset
        for _, tokens in self._pending:
            if need <= 0:
                break
            piece = tokens[offset : offset + need]
            offset = 0
            pieces.append(piece)
            need -= len(piece)
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)

    def advance(self, n: int) -> int:
        """Consume up to ``n`` tokens; returns how many were consumed."""
        self._fill(n)
        consumed = 0
        while consumed < n and self._pending:
            tokens = self._pending[0][1]
            step = min(len(tokens) - self._offset, n - consumed)
            self._offset += step
            consumed += step
            if self._offset >= len(tokens):
                self._pending.popleft()
                self._offset = 0
        self._available -= consumed
        return consumed


class _DocPos(NamedTuple):
    epoch: int
    shard_index: int
    row_group: int
    row_offset: int


def _as_tensors(window: np.ndarray, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    inputs = torch.from_numpy(np.ascontiguousarray(window[:-1]).reshape(batch_size, seq_len))
    targets = torch.from_numpy(np.ascontiguousarray(window[1:]).reshape(batch_size, seq_len))
    return inputs, targets


def _check_shape(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not valid for world_size {world_size}")


class TokenLoader:
    """Endless (or ``epochs``-long) iterator of ``(inputs, targets)`` LongTensors (B, T)."""

    def __init__(
        self,
        shards: Sequence[Path] | Path | str,
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        *,
        cursor: LoaderCursor | Mapping[str, int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        tokenizer_batch: int = DEFAULT_TOKENIZER_BATCH,
        seed: int | None = None,
        epochs: int | None = None,
    ) -> None:
        """``shards``: the training shard paths, or a shard directory (its training shards)."""
        _check_shape(batch_size, seq_len, rank, world_size)
        paths = list_shards(shards)[0] if isinstance(shards, (Path, str)) else [Path(p) for p in shards]
        if not paths:
            raise DataError("TokenLoader needs at least one training shard")
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.epochs = seed, epochs
        self.units: list[WorkUnit] = work_units(paths)
        if not any(unit.num_rows for unit in self.units):
            raise DataError(f"the training shards ({paths[0].parent}) hold no documents")
        self._unit_index = {(u.shard_index, u.row_group): i for i, u in enumerate(self.units)}
        self._files: dict[int, pq.ParquetFile] = {}
        start = cursor if isinstance(cursor, LoaderCursor) or cursor is None else LoaderCursor.from_dict(cursor)
        start = start or LoaderCursor(*self._unit_key(self._order(0)[0]))
        docs = self._documents(start)
        self._stream: TokenStream[_DocPos] = TokenStream(
            tokenize_documents(docs, tokenizer, tokenizer_batch), start.token_offset
        )
        self.steps = 0  # batches yielded by this loader object
        self._end_cursor = LoaderCursor(*self._unit_key(self._order(epochs or 0)[0]), epoch=epochs or 0)

    def _unit_key(self, unit: int) -> tuple[int, int]:
        return self.units[unit].shard_index, self.units[unit].row_group

    def _order(self, epoch: int) -> list[int]:
        """Unit indices in the order of ``epoch``."""
        if self.seed is None:
            return list(range(len(self.units)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.units))]

    def _documents(self, start: LoaderCursor) -> Iterator[tuple[_DocPos, str]]:
        unit = self._unit_index.get((start.shard_index, start.row_group))
        if unit is None:
            raise DataError(f"cursor names shard {start.shard_index} row group {start.row_group}, which the data lacks")
        if start.row_offset and start.row_offset >= self.units[unit].num_rows:
            raise DataError(f"cursor row {start.row_offset} is past the end of {self.units[unit].key}")
        return self._read_from(start.epoch, unit, start.row_offset)

    def _read_from(self, epoch: int, unit: int, row: int) -> Iterator[tuple[_DocPos, str]]:
        order = self._order(epoch)
        k = order.index(unit)
        while self.epochs is None or epoch < self.epochs:
            for index in order[k:]:
                work = self.units[index]
                if work.shard_index not in self._files:
                    self._files = {work.shard_index: open_shard(work.path)}  # one open shard at a time
                texts = read_row_group(work.path, work.row_group, parquet=self._files[work.shard_index])
                for offset in range(row, len(texts)):
                    yield _DocPos(epoch, work.shard_index, work.row_group, offset), texts[offset]
                row = 0
            epoch, k = epoch + 1, 0
            order = self._order(epoch)

    @property
    def cursor(self) -> LoaderCursor:
        """Where the next batch (of the next step, on every rank) begins."""
        head = self._stream.head()
        if head is None:
            return self._end_cursor
        position, offset = head
        return LoaderCursor(position.shard_index, position.row_group, position.row_offset, offset, position.epoch)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.batch_size * self.seq_len
        step = self.world_size * n
        window = self._stream.window(step + 1)
        if len(window) < step + 1:  # only with a finite number of epochs
            raise StopIteration
        self._stream.advance(step)
        self.steps += 1
        mine = window[self.rank * n : self.rank * n + n + 1]
        return _as_tensors(mine, self.batch_size, self.seq_len)


# --- work units (federated trainers) ----------------------------------------------


@dataclass(frozen=True)
class UnitBatch:
    """One rank's batch of a work unit."""

    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where padded
    num_tokens: int  # real targets in this batch (B·T except in the unit's last step)
    offset: int  # unit token offset where this step began
    next_offset: int  # where the next step begins: record it to resume the unit
    last: bool  # this is the unit's final step


def unit_token_stream(
    shard_path: Path, row_group: int, tokenizer: Tokenizer, *, tokenizer_batch: int = DEFAULT_TOKENIZER_BATCH
) -> np.ndarray:
    """All tokens of one work unit: its documents' ``[BOS] + tokens``, concatenated."""
    texts = read_row_group(Path(shard_path), row_group)
    arrays = [tokens for _, tokens in tokenize_documents(enumerate(texts), tokenizer, tokenizer_batch)]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)


def count_unit_tokens(shard_path: Path, row_group: int, tokenizer: Tokenizer) -> int:
    """How many targets (tokens trained on) a work unit yields: its stream length minus one."""
    return max(len(unit_token_stream(shard_path, row_group, tokenizer)) - 1, 0)


def _padded(values: np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, dtype=np.int64)
    out[: len(values)] = values
    return out


def iter_unit_batches(
    shard_path: Path,
    row_group: int,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    *,
    start_offset: int = 0,
    rank: int = 0,
    world_size: int = 1,
    tokenizer_batch: int = DEFAULT_TOKENIZER_BATCH,
) -> Iterator[UnitBatch]:
    """The batches of one work unit, from token ``start_offset`` (a previous ``next_offset``).

    Each step covers ``world_size·B·T`` targets; rank r takes the r-th slice.
    Every rank yields the same number of steps (DDP collectives stay in step);
    a rank whose slice of the last step is empty gets a fully padded batch with
    ``num_tokens == 0``.
    """
    import torch

    _check_shape(batch_size, seq_len, rank, world_size)
    stream = unit_token_stream(Path(shard_path), row_group, tokenizer, tokenizer_batch=tokenizer_batch)
    total = max(len(stream) - 1, 0)  # targets in the unit
    if not 0 <= start_offset <= total:
        raise DataError(f"start offset {start_offset} is outside {Path(shard_path).name}:{row_group} ({total} tokens)")
    n = batch_size * seq_len
    step = world_size * n
    for offset in range(start_offset, total, step):
        start = offset + rank * n
        inputs = _padded(stream[start : start + n], n, tokenizer.bos_id)
        targets = _padded(stream[start + 1 : start + n + 1], n, IGNORE_INDEX)
        yield UnitBatch(
            inputs=torch.from_numpy(inputs.reshape(batch_size, seq_len)),
            targets=torch.from_numpy(targets.reshape(batch_size, seq_len)),
            num_tokens=int(min(n, max(total - start, 0))),
            offset=offset,
            next_offset=min(offset + step, total),
            last=offset + step >= total,
        )
