"""Character splits for the Tiny-Shakespeare task: train/val at one cut, contiguous partitions, partition files.

The Flower NanoGPT example (after nanoGPT's ``shakespeare_char``) cuts the text
at character ``int(0.9 · N)``: the first 90 % trains, the last 10 % validates;
and it gives each of its clients one contiguous slice of the train part. Pilot
does the same, at character level (before tokenizing):

- :func:`split_text`: ``(train, val)`` = ``text[:n]``, ``text[n:]`` with
  ``n = int((1 - val_fraction) · len(text))``.
- :func:`partition_bounds` / :func:`partition_text`: part ``i`` of ``k`` is
  ``[i·L // k, (i+1)·L // k)``, so the parts are contiguous, in order, differ in
  length by at most one character, and cover the train part exactly once.
- :func:`train_text`: the train part back from a shard directory (its train
  documents are lossless consecutive slices, so their concatenation is it).
- :func:`write_split` (``pilot data split``): ``part_00000.txt …`` (one per
  SuperNode, its ``--node-config "data-path='…'"``), ``val.txt`` and
  ``split.json`` (source sha256, fraction, each file's character range), each
  written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pilot.data.shards import list_shards, read_shard_texts
from pilot.errors import ConfigError, DataError
from pilot.hashing import sha256_file

SPLIT_MANIFEST = "split.json"
VAL_FILE = "val.txt"


def part_name(index: int) -> str:
    return f"part_{index:05d}.txt"


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """``(train, val)``: the first ``int((1 - val_fraction) · len)`` characters, and the rest."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val-fraction must be between 0 and 1, got {val_fraction}")
    cut = int((1.0 - val_fraction) * len(text))
    if cut < 1 or cut >= len(text):
        raise DataError(f"cannot split {len(text)} characters with val-fraction {val_fraction}: "
                        "both parts need at least one character")
    return text[:cut], text[cut:]


def check_partition(partition_id: int, num_partitions: int) -> None:
    """Refuse a partition that does not exist, naming the node-config keys."""
    if num_partitions < 1:
        raise ConfigError(f"node-config num-partitions={num_partitions} must be >= 1")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node-config partition-id={partition_id} must be in [0, num-partitions="
                          f"{num_partitions})")


def partition_bounds(length: int, num_partitions: int, partition_id: int) -> tuple[int, int]:
    """``[start, end)`` of part ``partition_id`` of ``num_partitions`` contiguous parts of ``length`` items."""
    check_partition(partition_id, num_partitions)
    return partition_id * length // num_partitions, (partition_id + 1) * length // num_partitions


def partition_text(text: str, num_partitions: int, partition_id: int) -> str:
    start, end = partition_bounds(len(text), num_partitions, partition_id)
    if start == end:
        raise DataError(f"partition {partition_id} of {num_partitions} of {len(text)} characters is empty")
    return text[start:end]


def train_text(shard_dir: Path) -> str:
    """The train part of a shard directory: its train documents, concatenated in shard order."""
    train, _ = list_shards(shard_dir)
    return "".join("".join(read_shard_texts(path)) for path in train)


@dataclass(frozen=True)
class SplitSummary:
    out_dir: Path
    parts: list[Path]
    val: Path
    train_chars: int
    val_chars: int


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_split(source: Path, out_dir: Path, parts: int, *, val_fraction: float = 0.1,
                overwrite: bool = False) -> SplitSummary:
    """Write ``parts`` contiguous train partitions of ``source``, its validation part and ``split.json``."""
    if parts < 1:
        raise DataError(f"--parts must be >= 1, got {parts}")
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file {source} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {source} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    train, val = split_text(text, val_fraction)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output path {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [part_name(i) for i in range(parts)] + [VAL_FILE, SPLIT_MANIFEST]
    clash = [n for n in names if (out_dir / n).exists()]
    if clash and not overwrite:
        raise DataError(f"{out_dir} already holds {', '.join(clash)}; pass --overwrite to replace them")
    paths, ranges = [], []
    for index in range(parts):
        start, end = partition_bounds(len(train), parts, index)
        path = out_dir / part_name(index)
        _write_atomic(path, partition_text(train, parts, index))
        paths.append(path)
        ranges.append({"file": path.name, "start": start, "end": end})
    _write_atomic(out_dir / VAL_FILE, val)
    manifest = {"source": {"name": source.name, "sha256": sha256_file(source), "chars": len(text)},
                "val_fraction": val_fraction, "train_chars": len(train), "parts": ranges,
                "val": {"file": VAL_FILE, "start": len(train), "end": len(text)}}
    _write_atomic(out_dir / SPLIT_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return SplitSummary(out_dir=out_dir, parts=paths, val=out_dir / VAL_FILE, train_chars=len(train),
                        val_chars=len(val))
