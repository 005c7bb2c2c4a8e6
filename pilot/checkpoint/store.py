"""Saving, verifying and loading checkpoints, atomically and without pickle.

``save_checkpoint`` writes every tensor group as ``<group>.safetensors`` into a
hidden staging directory beside the target, fsyncs each file, writes the
sidecar last, fsyncs the staging directory, renames it into place and fsyncs
the parent. ``load_checkpoint`` / ``verify_checkpoint`` check sizes and sha256
against the sidecar before reading tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot.checkpoint.meta import (
    DEFAULT_GROUP,
    GROUP_NAME_RE,
    SIDECAR_NAME,
    TENSOR_SUFFIX,
    Checkpoint,
    CheckpointMeta,
    TensorFile,
    check_model_config,
    checkpoint_dir_of,
    read_checkpoint_meta,
)
from pilot.errors import CheckpointError
from pilot.hashing import sha256_file
from pilot.log import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)


def save_checkpoint(
    path: str | Path,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    meta: CheckpointMeta,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return its path.

    ``tensors`` is either one state dict (stored as group ``model``) or a
    mapping of group name -> state dict. Tensors are copied to CPU and made
    contiguous; bf16 and every other safetensors dtype round-trip exactly.
    An existing checkpoint at ``path`` is an error unless ``overwrite``.
    """
    target = Path(path)
    groups = _normalise_groups(tensors)
    if target.exists() and not overwrite:
        raise CheckpointError(f"checkpoint {target} already exists (pass overwrite=True to replace it)")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"checkpoint path {target} exists and is not a directory")
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        files = {name: _write_group(staging, name, state) for name, state in groups.items()}
        created = meta.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        final_meta = dataclasses.replace(meta, created_at=created, files=files)
        sidecar = json.dumps(final_meta.to_dict(), indent=2, sort_keys=True, allow_nan=False)
        _write_synced(staging / SIDECAR_NAME, sidecar.encode("utf-8"))  # last: the commit marker
        _fsync_dir(staging)
        _publish(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {target}: {exc}") from exc
        raise
    total = sum(entry.size for entry in files.values())
    log.info("checkpoint saved", path=str(target), bytes=total, seconds=round(time.perf_counter() - started, 3))
    return target


def _normalise_groups(
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """Turn the caller's tensors into {group: {name: contiguous CPU tensor}}."""
    import torch

    if not tensors:
        raise CheckpointError("nothing to save: no tensors given")
    values = list(tensors.values())
    if all(isinstance(v, torch.Tensor) for v in values):
        raw: Mapping[str, Mapping[str, Any]] = {DEFAULT_GROUP: tensors}  # type: ignore[dict-item]
    elif all(isinstance(v, Mapping) for v in values):
        raw = tensors  # type: ignore[assignment]
    else:
        raise CheckpointError("tensors must be one state dict or a mapping of group name -> state dict, not a mix")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for group, state in raw.items():
        if not isinstance(group, str) or not GROUP_NAME_RE.match(group):
            raise CheckpointError(f"tensor group name {group!r} must match {GROUP_NAME_RE.pattern}")
        seen_storage: set[int] = set()
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"group {group!r} entry {key!r} is a {type(value).__name__}, not a tensor")
            tensor = value.detach().to("cpu").contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen_storage and tensor.numel() > 0:
                tensor = tensor.clone()  # safetensors refuses shared storage (e.g. tied weights)
            seen_storage.add(tensor.untyped_storage().data_ptr())
            out[str(key)] = tensor
        groups[group] = out
    return groups


def _write_group(directory: Path, group: str, state: dict[str, torch.Tensor]) -> TensorFile:
    from safetensors.torch import save_file

    name = f"{group}{TENSOR_SUFFIX}"
    file_path = directory / name
    save_file(state, str(file_path), metadata={"format": "pt", "pilot_group": group})
    _fsync_file(file_path)
    return TensorFile(file=name, sha256=sha256_file(file_path), size=file_path.stat().st_size, tensors=len(state))


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished staging dir to ``target``, replacing an old one safely."""
    if not target.exists():
        os.rename(staging, target)
        _fsync_dir(target.parent)
        return
    backup = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)  # put the previous checkpoint back
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_checkpoint(path: str | Path, *, groups: Iterable[str] | None = None) -> CheckpointMeta:
    """Check sidecar, file sizes and sha256 of every (or the given) group; return the metadata."""
    directory = checkpoint_dir_of(path)
    meta = read_checkpoint_meta(directory)
    for group in _select_groups(meta, groups, directory):
        _verify_file(directory, group, meta.files[group], check_hash=True)
    return meta


def load_checkpoint(
    path: str | Path,
    *,
    expect_model_config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    groups: Iterable[str] | None = None,
    check_hash: bool = True,
) -> Checkpoint:
    """Verify and load a checkpoint's tensor groups (all, or ``groups``) onto ``device``.

    ``expect_model_config`` (e.g. ``dataclasses.asdict(cfg)``) must equal the
    stored model config; otherwise a CheckpointError names the differing keys.
    File sizes are always checked; ``check_hash=False`` skips the sha256 pass.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = checkpoint_dir_of(path)
    meta = read_checkpoint_meta(directory)
    if expect_model_config is not None:
        check_model_config(meta, expect_model_config, source=str(directory))
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for group in _select_groups(meta, groups, directory):
        entry = meta.files[group]
        file_path = _verify_file(directory, group, entry, check_hash=check_hash)
        try:
            state = load_file(str(file_path), device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read tensor file {file_path}: {exc}") from exc
        if len(state) != entry.tensors:
            raise CheckpointError(f"tensor file {file_path} holds {len(state)} tensors, sidecar says {entry.tensors}")
        loaded[group] = state
    return Checkpoint(path=directory, meta=meta, tensors=loaded)


def _select_groups(meta: CheckpointMeta, groups: Iterable[str] | None, directory: Path) -> list[str]:
    if groups is None:
        return list(meta.files)
    chosen = list(groups)
    unknown = [g for g in chosen if g not in meta.files]
    if unknown:
        raise CheckpointError(f"checkpoint {directory} has no tensor group(s) {unknown} (has {sorted(meta.files)})")
    return chosen


def _verify_file(directory: Path, group: str, entry: TensorFile, *, check_hash: bool) -> Path:
    file_path = directory / entry.file
    try:
        size = file_path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"tensor file {file_path} (group {group!r}) is missing") from None
    if size != entry.size:
        raise CheckpointError(
            f"tensor file {file_path} (group {group!r}) has {size} bytes, expected {entry.size} (truncated or replaced)"
        )
    if check_hash:
        actual = sha256_file(file_path)
        if actual != entry.sha256:
            raise CheckpointError(
                f"tensor file {file_path} (group {group!r}) sha256 mismatch: expected {entry.sha256}, got {actual}"
            )
    return file_path
