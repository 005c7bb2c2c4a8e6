"""`pilot data` commands: import local text, download FineWeb-EDU, describe a shard dir.

- ``pilot data import-text FILE… --out DIR`` cuts text into documents and writes
  ``shard_NNNNN.parquet`` files (last = validation); prints what it wrote.
- ``pilot data download --shards N [--out DIR]`` fetches FineWeb-EDU shards
  (resumable; default ``$PILOT_BASE_DIR/data/fineweb-edu``).
- ``pilot data info DIR`` lists shards, rows, row groups and bytes.
- ``pilot data split --parts N --out DIR [--val-fraction 0.1] TEXT`` cuts TEXT
  as the shakespeare task does (first 90 % train, last 10 % validation) and
  writes the train part's N contiguous partitions ``part_00000.txt …``, the
  validation part ``val.txt`` and ``split.json``: one partition per SuperNode
  (``--node-config "data-path='DIR/part_00000.txt'"``).

Library errors (``PilotError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pilot.cli.common import user_errors

data_app = typer.Typer(help="Training data: import text, download FineWeb-EDU, inspect shards.", no_args_is_help=True)


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@data_app.command("import-text")
def import_text_command(
    files: Annotated[list[Path], typer.Argument(help="UTF-8 text files, in order")],
    out: Annotated[Path, typer.Option("--out", help="output directory for the shards")],
    row_group_docs: Annotated[int, typer.Option(help="documents per row group (one work unit)")] = 16,
    row_groups_per_shard: Annotated[int, typer.Option(help="row groups per shard")] = 8,
    doc_chars: Annotated[int, typer.Option(help="target characters per document")] = 2048,
    val_fraction: Annotated[
        float, typer.Option(help="fraction of the text held out (at the end) for validation")
    ] = 0.1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace shards already in --out")] = False,
) -> None:
    """Turn local text into parquet shards (the last shard is validation)."""
    from pilot.data import import_text

    with user_errors():
        summary = import_text(
            files,
            out,
            doc_chars=doc_chars,
            docs_per_row_group=row_group_docs,
            row_groups_per_shard=row_groups_per_shard,
            val_fraction=val_fraction,
            overwrite=overwrite,
        )
    typer.echo(
        f"wrote {summary.num_shards} shards to {summary.out_dir}: "
        f"{summary.train_docs} train docs ({_size(summary.train_bytes)}, {summary.train_row_groups} row groups) "
        f"in {len(summary.train_shards)} shards + {summary.val_docs} validation docs "
        f"({_size(summary.val_bytes)}, {summary.val_row_groups} row groups) in {summary.val_shard.name}"
    )


@data_app.command("download")
def download_command(
    shards: Annotated[int, typer.Option("--shards", help="how many FineWeb-EDU shards (the last is validation)")],
    out: Annotated[Path | None, typer.Option("--out", help="default: $PILOT_BASE_DIR/data/fineweb-edu")] = None,
    base_url: Annotated[str | None, typer.Option(help="mirror serving shard_NNNNN.parquet files")] = None,
) -> None:
    """Download FineWeb-EDU shards (skips complete files, resumes partial ones)."""
    from pilot.data import FINEWEB_BASE_URL, download_fineweb
    from pilot.paths import data_dir

    target = out if out is not None else data_dir() / "fineweb-edu"
    with user_errors():
        paths = download_fineweb(target, shards, base_url=base_url or FINEWEB_BASE_URL)
    total = sum(p.stat().st_size for p in paths)
    typer.echo(f"{len(paths)} shards ({_size(total)}) in {target}; validation: {paths[-1].name}")


@data_app.command("info")
def info_command(directory: Annotated[Path, typer.Argument(help="a shard directory")]) -> None:
    """Shards, rows, row groups and bytes of a shard directory."""
    from rich.console import Console
    from rich.table import Table

    from pilot.data import dataset_info

    with user_errors():
        info = dataset_info(directory)
    table = Table(title=str(info.directory))
    for column in ("shard", "split", "rows", "row groups", "file", "text"):
        table.add_column(column, justify="left" if column in ("shard", "split") else "right", no_wrap=column == "shard")
    for meta in info.shards:
        split = "validation" if meta is info.val else "train"
        table.add_row(
            meta.path.name,
            split,
            f"{meta.num_rows:,}",
            str(meta.num_row_groups),
            _size(meta.file_bytes),
            _size(meta.text_bytes),
        )
    console = Console()
    console.print(table)
    console.print(
        f"{len(info.shards)} shards ({len(info.train)} train + 1 validation), {info.num_rows:,} rows, "
        f"{info.num_row_groups} row groups, {_size(info.file_bytes)} on disk"
    )


@data_app.command("split")
def split_command(
    text: Annotated[Path, typer.Argument(help="the UTF-8 text to split (e.g. Tiny Shakespeare's input.txt)")],
    parts: Annotated[int, typer.Option("--parts", help="contiguous train partitions (one per SuperNode)", min=1)],
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    val_fraction: Annotated[float, typer.Option(help="fraction held out at the end for validation")] = 0.1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace partition files already in --out")] = False,
) -> None:
    """Write the train part's contiguous partitions and the validation part (the shakespeare task's split)."""
    from pilot.data.split import write_split

    with user_errors():
        summary = write_split(text, out, parts, val_fraction=val_fraction, overwrite=overwrite)
    for path in summary.parts:
        typer.echo(f"{path}  ({_size(path.stat().st_size)})")
    typer.echo(f"{summary.val}  ({_size(summary.val.stat().st_size)}, validation)")
    typer.echo(f"{len(summary.parts)} partitions of {summary.train_chars:,} train characters; "
               f"{summary.val_chars:,} validation characters. Point each SuperNode at one: "
               f"--node-config \"data-path='{summary.parts[0]}'\"")


def register(app: typer.Typer) -> None:
    """Add ``pilot data …`` to the main `pilot` app."""
    app.add_typer(data_app, name="data")
