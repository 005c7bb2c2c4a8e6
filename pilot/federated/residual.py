"""The trainer's error-feedback residual on disk, between ClientApp processes.

Flower 1.41 starts a fresh ClientApp process for every message, so the residual that
``UpdateCodec.encode`` returns cannot live in memory from one round to the next. The trainer keeps it in its
work dir as one safetensors file (fp32 tensors keyed by parameter name, no pickle), written atomically
(temporary file, fsync, rename) so a trainer killed mid-write leaves the previous residual intact.

- ``save_residual(path, residual)``: write it (``None`` or empty deletes the file: nothing to carry).
- ``load_residual(path, expected_shapes)``: read it back, or ``None`` when there is none or it belongs to
  another model (names or shapes differ: e.g. the run changed model); a corrupt or non-finite file is discarded
  with a warning, because a lost residual only costs one round of quantisation error, never correctness.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pilot.log import get_logger

log = get_logger(__name__)


def save_residual(path: str | Path, residual: Mapping[str, Tensor] | None) -> None:
    """Atomically write ``residual`` to ``path`` (fp32, contiguous CPU); ``None``/empty removes the file."""
    target = Path(path)
    if not residual:
        target.unlink(missing_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(device="cpu", dtype=torch.float32).contiguous() for name, t in residual.items()}
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(staging))
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def load_residual(path: str | Path, expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor] | None:
    """The residual saved at ``path`` if it matches ``expected_shapes`` exactly, else ``None``."""
    source = Path(path)
    if not source.is_file():
        return None
    try:
        tensors = load_file(str(source))
    except (SafetensorError, OSError, ValueError) as exc:
        log.warning("discarding unreadable error-feedback residual", path=str(source), error=str(exc))
        return None
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    wanted = {name: tuple(shape) for name, shape in expected_shapes.items()}
    if shapes != wanted or any(t.dtype != torch.float32 for t in tensors.values()):
        log.warning("discarding error-feedback residual of another model", path=str(source))
        return None
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        log.warning("discarding non-finite error-feedback residual", path=str(source))
        return None
    return tensors
