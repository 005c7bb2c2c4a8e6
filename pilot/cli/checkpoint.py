"""`pilot checkpoint` commands: inspect and verify checkpoint directories.

- ``pilot checkpoint verify PATH``: check the sidecar and the size and sha256 of
  every tensor file; print the summary and exit 0, or print the reason on one
  line to stderr and exit 2 (missing, incomplete, truncated or tampered).
- ``pilot checkpoint info PATH [--json]``: print the metadata and, per tensor
  group, its file, size, tensor count and parameter count (read from the
  safetensors headers; nothing is hashed or loaded).

PATH is a checkpoint directory (e.g. ``runs/<id>/checkpoints/round_00012``) or
its ``checkpoint.json``. Neither command imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from pilot.errors import PilotError

if TYPE_CHECKING:
    from pilot.checkpoint import CheckpointMeta

PathArg = Annotated[Path, typer.Argument(help="Checkpoint directory or its checkpoint.json.", show_default=False)]


def register(app: typer.Typer) -> None:
    """Add the `checkpoint` command group to the main `pilot` app."""
    group = typer.Typer(help="Inspect and verify checkpoints.", no_args_is_help=True)

    @group.command("verify")
    def verify(path: PathArg) -> None:
        """Verify sizes and sha256 of every tensor file; exit 2 if anything is wrong."""
        from pilot.checkpoint import checkpoint_dir_of, verify_checkpoint

        try:
            meta = verify_checkpoint(path)
            groups = _group_stats(checkpoint_dir_of(path), meta)
        except PilotError as exc:
            _fail(exc)
        typer.echo(_render(checkpoint_dir_of(path), meta, groups))
        typer.echo(f"OK: {len(meta.files)} tensor file(s) match their size and sha256")

    @group.command("info")
    def info(
        path: PathArg,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    ) -> None:
        """Show a checkpoint's metadata and tensor groups (no hashing)."""
        from pilot.checkpoint import checkpoint_dir_of, read_checkpoint_meta

        try:
            meta = read_checkpoint_meta(path)
            directory = checkpoint_dir_of(path)
            groups = _group_stats(directory, meta)
        except PilotError as exc:
            _fail(exc)
        if as_json:
            typer.echo(json.dumps({"path": str(directory), **meta.to_dict(), "groups": groups}, indent=2))
        else:
            typer.echo(_render(directory, meta, groups))

    app.add_typer(group, name="checkpoint")


def _fail(exc: PilotError) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def _group_stats(directory: Path, meta: CheckpointMeta) -> dict[str, dict[str, Any]]:
    """Per group: tensor count, parameter count and dtypes, from the safetensors header."""
    from pilot.checkpoint import read_tensor_index

    stats: dict[str, dict[str, Any]] = {}
    for group, entry in meta.files.items():
        index = read_tensor_index(directory / entry.file)
        stats[group] = {
            "tensors": len(index),
            "parameters": sum(info.numel for info in index.values()),
            "dtypes": sorted({info.dtype for info in index.values()}),
        }
    return stats


def _render(directory: Path, meta: CheckpointMeta, groups: dict[str, dict[str, Any]]) -> str:
    position = ", ".join(f"{k} {v}" for k, v in (("round", meta.round), ("step", meta.step)) if v is not None)
    tokenizer = f"{meta.tokenizer.name} (sha256 {meta.tokenizer.sha256[:12]}…)" if meta.tokenizer else "-"
    lines = [
        f"checkpoint  {directory}",
        f"kind        {meta.kind}" + (f" ({position})" if position else ""),
        f"tokens      {meta.tokens_seen:,}",
        f"created     {meta.created_at}",
        f"tokenizer   {tokenizer}",
        f"model       {_inline(meta.model_config)}",
        f"extra       {_inline(meta.extra)}",
        "files",
    ]
    for group, entry in meta.files.items():
        stat = groups.get(group, {})
        lines.append(
            f"  {group:<16} {entry.file:<28} {_size(entry.size):>10}  sha256 {entry.sha256[:12]}…  "
            f"{stat.get('tensors', entry.tensors)} tensors, {stat.get('parameters', 0):,} values "
            f"{'/'.join(stat.get('dtypes', []))}"
        )
    return "\n".join(lines)


def _inline(mapping: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in mapping.items()) or "-"


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
