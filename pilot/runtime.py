"""Device, precision, seeding and torch.distributed set-up shared by every process.

- ``pick_device("auto"|"cpu"|"cuda"|"cuda:1"|"mps")``: CUDA when present, else CPU.
- ``autocast(device, dtype)``: bf16 autocast on CUDA, a no-op context elsewhere
  (CPU bf16 autocast is slow on most CPUs, so ``auto`` means fp32 there).
- ``seed_everything(seed)``: the seed a config names is applied, always.
- ``DistInfo`` / ``init_distributed()``: reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK,
  starts a process group (NCCL on CUDA, gloo on CPU) only when WORLD_SIZE > 1,
  so the same code path runs with and without DDP.
- ``replicate(model, dist, device, compile=...)``: the module to train: the model
  wrapped in DistributedDataParallel when the process group has several ranks
  (its constructor broadcasts rank 0's weights), then torch.compile'd on request.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import torch

from pilot.errors import ConfigError


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} asked for but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``spec`` (auto|float32|bfloat16); None = no autocast."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if spec == "float32":
        return None
    if spec == "bfloat16":
        return torch.bfloat16
    raise ConfigError(f"dtype: unknown value {spec!r}; allowed values: auto, float32, bfloat16")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env(environ: dict[str, str] | None = None) -> DistInfo:
    env = os.environ if environ is None else environ
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
    )


def init_distributed(device: torch.device) -> DistInfo:
    """Start the process group when launched by torchrun with WORLD_SIZE > 1."""
    info = dist_info_from_env()
    if info.is_distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return info


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def replicate(model: torch.nn.Module, dist: DistInfo, device: torch.device, *,
              compile: bool = False) -> torch.nn.Module:
    """The module to train: ``model`` under DDP when ``dist`` has several ranks (gradients averaged on
    backward), then ``torch.compile``'d when ``compile``; the parameters stay ``model``'s."""
    train_model = model
    if dist.is_distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return torch.compile(train_model) if compile else train_model  # type: ignore[return-value]


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[DistInfo]:
    info = init_distributed(device)
    try:
        yield info
    finally:
        shutdown_distributed()
