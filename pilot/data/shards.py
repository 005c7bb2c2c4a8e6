"""Parquet shards on disk: layout, validation, reading, atomic writing.

The layout is FineWeb-EDU's: a directory of ``shard_00000.parquet``,
``shard_00001.parquet``, … each with a string ``text`` column, one document per
row. The LAST shard (by name) is the validation split; all others are training
data. Row groups are the unit of work the federated ledger leases out, so
``work_units`` enumerates ``(shard, row_group)`` pairs in a fixed order.

Everything here raises ``DataError`` naming the offending file or directory.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pilot.errors import DataError

TEXT_COLUMN = "text"
SHARD_PATTERN = re.compile(r"^shard_(\d{5,})\.parquet$")
MANIFEST_FILE = "import.json"  # written by import_text; absent for downloaded FineWeb


def shard_name(index: int) -> str:
    """``shard_00042.parquet`` for index 42."""
    return f"shard_{index:05d}.parquet"


@dataclass(frozen=True)
class ShardMeta:
    """What a shard's parquet footer says (no row data is read)."""

    path: Path
    num_rows: int
    row_group_rows: tuple[int, ...]  # rows in each row group
    file_bytes: int
    text_bytes: int  # uncompressed size of the column data, from the footer

    @property
    def num_row_groups(self) -> int:
        return len(self.row_group_rows)


@dataclass(frozen=True)
class WorkUnit:
    """One row group of one training shard: what the ledger leases to a trainer."""

    shard_index: int
    row_group: int
    path: Path
    num_rows: int

    @property
    def key(self) -> str:
        """Stable id of the unit, e.g. ``shard_00003.parquet:7``."""
        return f"{self.path.name}:{self.row_group}"


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard, checking it is parquet with a string ``text`` column."""
    if not path.is_file():
        raise DataError(f"shard {path} does not exist")
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"shard {path} is not a readable parquet file ({exc})") from None
    if TEXT_COLUMN not in schema.names:
        raise DataError(f"shard {path} has no '{TEXT_COLUMN}' column (columns: {', '.join(schema.names) or 'none'})")
    field_type = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise DataError(f"shard {path} has a '{TEXT_COLUMN}' column of type {field_type}, expected string")
    return parquet


def shard_meta(path: Path) -> ShardMeta:
    """Footer facts of one shard (validates it like ``open_shard``)."""
    parquet = open_shard(path)
    metadata = parquet.metadata
    rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    text_bytes = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return ShardMeta(path, metadata.num_rows, rows, path.stat().st_size, text_bytes)


def read_row_group(path: Path, row_group: int, *, parquet: pq.ParquetFile | None = None) -> list[str]:
    """The documents of one row group (a null row reads as an empty document).

    Pass an already opened ``parquet`` for ``path`` to skip re-reading the footer.
    """
    if parquet is None:
        parquet = open_shard(path)
    count = parquet.metadata.num_row_groups
    if not 0 <= row_group < count:
        raise DataError(f"row group {row_group} does not exist in {path} (it has {count})")
    try:
        column = parquet.read_row_group(row_group, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read row group {row_group} of {path}: {exc}") from None
    return [text if text is not None else "" for text in column.to_pylist()]


def read_shard_texts(path: Path) -> list[str]:
    """Every document of a shard, in row order."""
    parquet = open_shard(path)
    texts: list[str] = []
    for row_group in range(parquet.metadata.num_row_groups):
        texts.extend(read_row_group(path, row_group, parquet=parquet))
    return texts


def shard_paths(directory: Path) -> list[Path]:
    """The ``shard_*.parquet`` files of a directory, sorted (no validation)."""
    if not directory.exists():
        raise DataError(f"data directory {directory} does not exist")
    if not directory.is_dir():
        raise DataError(f"data path {directory} is not a directory of parquet shards")
    return sorted(p for p in directory.iterdir() if SHARD_PATTERN.match(p.name) and p.is_file())


def list_shards(directory: str | Path) -> tuple[list[Path], Path]:
    """``(train_shards, val_shard)`` of a shard directory; the last shard is validation.

    Every shard's footer is checked (parquet, string ``text`` column); at least
    two shards are needed so that training and validation never share text.
    """
    directory = Path(directory)
    paths = shard_paths(directory)
    if not paths:
        if not any(directory.iterdir()):
            raise DataError(f"data directory {directory} is empty: import text or download shards into it")
        raise DataError(f"data directory {directory} holds no shard_NNNNN.parquet files")
    if len(paths) < 2:
        raise DataError(
            f"data directory {directory} has only {paths[0].name}: need at least two shards "
            "(training shards + the last one for validation)"
        )
    for path in paths:
        open_shard(path)
    return paths[:-1], paths[-1]


def work_units(train_shards: Sequence[Path]) -> list[WorkUnit]:
    """Every ``(shard, row_group)`` of the training shards, in shard then row-group order."""
    units: list[WorkUnit] = []
    for index, path in enumerate(train_shards):
        meta = shard_meta(path)
        units.extend(WorkUnit(index, rg, path, rows) for rg, rows in enumerate(meta.row_group_rows))
    return units


def resolve_unit(directory: str | Path, key: str) -> tuple[Path, int]:
    """``(shard path, row group)`` of a ledger unit key such as ``shard_00003.parquet:7``."""
    name, _, row_group = key.rpartition(":")
    if not SHARD_PATTERN.match(name) or not row_group.isdigit():
        raise DataError(f"work unit {key!r} is not of the form shard_NNNNN.parquet:ROW_GROUP")
    path = Path(directory) / name
    count = open_shard(path).metadata.num_row_groups
    if int(row_group) >= count:
        raise DataError(f"work unit {key!r}: {path} has only {count} row groups")
    return path, int(row_group)


def write_shard(path: Path, docs: Sequence[str], *, docs_per_row_group: int) -> ShardMeta:
    """Write ``docs`` as one shard atomically (temp file in the same dir, fsync, rename)."""
    if docs_per_row_group < 1:
        raise DataError(f"docs_per_row_group must be >= 1, got {docs_per_row_group}")
    table = pa.table({TEXT_COLUMN: pa.array(list(docs), type=pa.string())})
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp_name, row_group_size=docs_per_row_group, compression="zstd")
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return shard_meta(path)


@dataclass(frozen=True)
class DatasetInfo:
    """Summary of a shard directory (``pilot data info``)."""

    directory: Path
    shards: tuple[ShardMeta, ...]  # all shards; the last is validation

    @property
    def train(self) -> tuple[ShardMeta, ...]:
        return self.shards[:-1]

    @property
    def val(self) -> ShardMeta:
        return self.shards[-1]

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def num_row_groups(self) -> int:
        return sum(s.num_row_groups for s in self.shards)

    @property
    def file_bytes(self) -> int:
        return sum(s.file_bytes for s in self.shards)


def dataset_info(directory: str | Path) -> DatasetInfo:
    """Validate a shard directory and read every shard's footer facts."""
    train, val = list_shards(directory)
    return DatasetInfo(Path(directory), tuple(shard_meta(p) for p in [*train, val]))
