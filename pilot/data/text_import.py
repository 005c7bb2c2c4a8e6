"""Turn local text files into the shard layout (``pilot data import-text``).

Document rule (``split_documents``): documents are contiguous, lossless slices
of each file, so concatenating every document in shard order gives back the
input files' text exactly, and no document spans two files. A file is cut into
documents of about ``doc_chars`` characters:

1. the cut goes at a paragraph start (just after a run of blank lines) — the
   first one at or past ``doc_chars``, else the last one past ``doc_chars/2``,
   within a window of ``[doc_chars/2, 2·doc_chars]`` characters;
2. with no paragraph break in that window (text without blank lines), at a line
   start, chosen the same way;
3. with neither, hard at ``doc_chars`` characters.

So Tiny Shakespeare's short speeches are packed together into ~2 KiB documents
and a text without blank lines still gets sensible cuts. The validation split is
held out at the end: the last documents of the last file(s) that together hold
at least ``val_fraction`` of all characters (or exactly ``val_docs`` documents).
With ``exact_split=True`` (the shakespeare task) the files' text is instead cut at
character ``int((1 - val_fraction) · N)``, as the Flower/nanoGPT example does
(``pilot.data.split.split_text``): the train part is cut into documents by the
rule above, and the validation part is one document, so it is scored as one
contiguous stream. Training documents fill ``shard_00000…`` with ``docs_per_row_group`` rows per
row group and ``row_groups_per_shard`` row groups per shard; the validation
documents go into the final shard. ``import.json`` (sources, options, counts) is
written last, so its presence marks a complete import.

``resolve_data(path)`` lets ``--data input.txt`` just work: a text file is
imported once into a cache directory keyed by its sha256 (and ``-exact`` for an
exact split).
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pilot.data.shards import MANIFEST_FILE, SHARD_PATTERN, list_shards, shard_name, write_shard
from pilot.errors import DataError
from pilot.hashing import sha256_file
from pilot.log import get_logger
from pilot.paths import data_dir

log = get_logger(__name__)

DEFAULT_DOC_CHARS = 2048
DEFAULT_DOCS_PER_ROW_GROUP = 16
DEFAULT_ROW_GROUPS_PER_SHARD = 8
DEFAULT_VAL_FRACTION = 0.1
_BLANK_RUN = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def _pick(boundaries: list[int], start: int, doc_chars: int) -> int | None:
    """The preferred cut among sorted ``boundaries`` for a document starting at ``start``."""
    lo, target, hi = start + doc_chars // 2, start + doc_chars, start + 2 * doc_chars
    i = bisect.bisect_left(boundaries, target)
    if i < len(boundaries) and boundaries[i] <= hi:
        return boundaries[i]
    j = bisect.bisect_right(boundaries, target) - 1  # the last boundary before target
    if j >= 0 and boundaries[j] > max(lo, start):
        return boundaries[j]
    return None


def split_documents(text: str, doc_chars: int = DEFAULT_DOC_CHARS) -> list[str]:
    """Cut ``text`` into documents by the rule in the module docstring (lossless)."""
    if doc_chars < 2:
        raise DataError(f"doc_chars must be >= 2, got {doc_chars}")
    paragraphs = [m.end() for m in _BLANK_RUN.finditer(text)]
    lines = [m.end() for m in re.finditer("\n", text)]
    docs: list[str] = []
    start, n = 0, len(text)
    while start < n:
        if n - start <= doc_chars * 3 // 2:
            cut = n
        else:
            cut = _pick(paragraphs, start, doc_chars) or _pick(lines, start, doc_chars) or start + doc_chars
        docs.append(text[start:cut])
        start = cut
    return docs


@dataclass(frozen=True)
class ShardSummary:
    """What an import wrote."""

    out_dir: Path
    train_shards: list[Path]
    val_shard: Path
    train_docs: int
    val_docs: int
    train_bytes: int  # UTF-8 bytes of the training documents
    val_bytes: int
    train_row_groups: int
    val_row_groups: int
    options: dict[str, float | int | bool | None] = field(default_factory=dict)

    @property
    def num_docs(self) -> int:
        return self.train_docs + self.val_docs

    @property
    def num_bytes(self) -> int:
        return self.train_bytes + self.val_bytes

    @property
    def num_shards(self) -> int:
        return len(self.train_shards) + 1

    @property
    def num_row_groups(self) -> int:
        return self.train_row_groups + self.val_row_groups


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read text file {path}: {exc}") from None


def _split_validation(docs: list[str], val_fraction: float, val_docs: int | None) -> int:
    """Index of the first validation document."""
    if val_docs is not None:
        count = val_docs
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        want = val_fraction * sum(len(d) for d in docs)
        count, held = 0, 0
        while held < want and count < len(docs):
            count += 1
            held += len(docs[-count])
    if not 1 <= count < len(docs):
        raise DataError(
            f"cannot hold out {count} of {len(docs)} documents for validation: "
            "need at least one training and one validation document (more text, or smaller doc_chars)"
        )
    return len(docs) - count


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output path {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = list(out_dir.iterdir())
    if existing and not overwrite:
        raise DataError(
            f"output directory {out_dir} is not empty ({len(existing)} entries); "
            "pass overwrite=True (--overwrite) to replace its shards"
        )
    for entry in existing:  # only what an import writes: shards, the manifest, temp files
        if SHARD_PATTERN.match(entry.name) or entry.name == MANIFEST_FILE or entry.name.endswith(".tmp"):
            entry.unlink()


def import_text(
    files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    doc_chars: int = DEFAULT_DOC_CHARS,
    docs_per_row_group: int = DEFAULT_DOCS_PER_ROW_GROUP,
    row_groups_per_shard: int = DEFAULT_ROW_GROUPS_PER_SHARD,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_docs: int | None = None,
    overwrite: bool = False,
    exact_split: bool = False,
) -> ShardSummary:
    """Import UTF-8 text files into shards under ``out_dir`` (see the module docstring)."""
    if not files:
        raise DataError("import_text needs at least one text file")
    if docs_per_row_group < 1 or row_groups_per_shard < 1:
        raise DataError("docs_per_row_group and row_groups_per_shard must be >= 1")
    paths = [Path(f) for f in files]
    if exact_split:
        from pilot.data.split import split_text

        train_text, val_text = split_text("".join(_read_text(path) for path in paths), val_fraction)
        train, val = split_documents(train_text, doc_chars), [val_text]
    else:
        docs: list[str] = []
        for path in paths:
            docs.extend(split_documents(_read_text(path), doc_chars))
        if not docs:
            raise DataError(f"no text in {', '.join(str(p) for p in paths)}")
        first_val = _split_validation(docs, val_fraction, val_docs)
        train, val = docs[:first_val], docs[first_val:]

    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    per_shard = docs_per_row_group * row_groups_per_shard
    train_metas = [
        write_shard(out / shard_name(i), train[start : start + per_shard], docs_per_row_group=docs_per_row_group)
        for i, start in enumerate(range(0, len(train), per_shard))
    ]
    val_meta = write_shard(out / shard_name(len(train_metas)), val, docs_per_row_group=docs_per_row_group)
    options: dict[str, float | int | bool | None] = {
        "doc_chars": doc_chars,
        "docs_per_row_group": docs_per_row_group,
        "row_groups_per_shard": row_groups_per_shard,
        "val_fraction": val_fraction if val_docs is None else None,
        "val_docs": val_docs,
        "exact_split": exact_split,
    }
    summary = ShardSummary(
        out_dir=out,
        train_shards=[m.path for m in train_metas],
        val_shard=val_meta.path,
        train_docs=len(train),
        val_docs=len(val),
        train_bytes=sum(len(d.encode("utf-8")) for d in train),
        val_bytes=sum(len(d.encode("utf-8")) for d in val),
        train_row_groups=sum(m.num_row_groups for m in train_metas),
        val_row_groups=val_meta.num_row_groups,
        options=options,
    )
    _write_manifest(out, paths, summary)
    log.info("imported text", out_dir=str(out), docs=summary.num_docs, shards=summary.num_shards)
    return summary


def _write_manifest(out: Path, sources: list[Path], summary: ShardSummary) -> None:
    record = {
        "sources": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sources],
        "options": summary.options,
        "summary": {
            key: value
            for key, value in asdict(summary).items()
            if key not in ("out_dir", "train_shards", "val_shard", "options")
        },
        "shards": [p.name for p in [*summary.train_shards, summary.val_shard]],
    }
    fd, tmp_name = tempfile.mkstemp(dir=out, prefix=".import.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_name, out / MANIFEST_FILE)


def resolve_data(path: str | Path, cache_dir: str | Path | None = None, *, exact_split: bool = False) -> Path:
    """The shard directory for ``path``: a shard directory as is, or a text file
    imported (once, default options) into ``cache_dir/<stem>-<sha256[:16]>`` (``…-exact``
    with ``exact_split``).

    The import is written to a temporary directory and renamed into place, so two
    processes resolving the same file at once both end up with one complete copy.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(f"data path {source} does not exist")
    if source.is_dir():
        list_shards(source)
        return source
    cache_root = Path(cache_dir) if cache_dir is not None else data_dir() / "imported"
    target = cache_root / f"{source.stem}-{sha256_file(source)[:16]}{'-exact' if exact_split else ''}"
    if (target / MANIFEST_FILE).is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{target.name}."))
    try:
        import_text([source], staging, exact_split=exact_split)
        if target.exists() and not (target / MANIFEST_FILE).is_file():
            shutil.rmtree(target)  # a leftover without its manifest is incomplete
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / MANIFEST_FILE).is_file():  # lost a race only if the winner is complete
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
