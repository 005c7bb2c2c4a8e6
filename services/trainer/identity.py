"""Who a trainer is and where its state lives, from a SuperNode's ``--node-config`` (no torch here).

- :class:`TrainerIdentity`: trainer id, Flower node id, work dir, this node's own
  data, device override, Flower's partition, and the DDP ranks it trains on.
- :func:`default_work_dir`: ``$PILOT_BASE_DIR/trainers/<run>/<trainer>``; what in it
  carries over from round to round (``INNER_STATE``, ``RESIDUAL_FILE``), and
  :func:`reset_trainer_state`, which removes that for a fresh run.
- :func:`identity_from_node_config`: the node-config keys ``trainer-id`` (default
  ``node-<id>``), ``work-dir``, ``data-path``, ``device``, ``num-devices``,
  ``partition-id`` / ``num-partitions`` turned into a :class:`TrainerIdentity`.

Kept apart from ``local_round`` (which imports torch) so the thin ClientApp and
the trainer host's client side can name a trainer without importing torch.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot import paths
from pilot.errors import ConfigError


@dataclass(frozen=True)
class TrainerIdentity:
    trainer_id: str
    node_id: int
    work_dir: Path
    data_path: Path | None = None  # this node's own data (deployment partitions)
    device: str | None = None  # overrides the run's device on this node
    partition_id: int | None = None  # Flower's node-config partition-id: this node's slice of the data
    num_partitions: int | None = None  # Flower's node-config num-partitions
    num_devices: int = 1  # devices (DDP ranks) this trainer trains on


INNER_STATE = "inner"  # work-dir checkpoint of the inner optimiser state and inner step
RESIDUAL_FILE = "residual.safetensors"  # the int8 update's error-feedback residual


def default_work_dir(run_id: str, trainer_id: str) -> Path:
    return paths.base_dir() / "trainers" / run_id / trainer_id


def reset_trainer_state(work_dir: Path) -> list[Path]:
    """Remove what a trainer carries from one round to the next (a fresh run must not inherit another
    run's inner optimiser or residual); the paths removed. Caches (tokenizer, compiled kernels) stay."""
    removed = []
    for path in (Path(work_dir) / INNER_STATE, Path(work_dir) / RESIDUAL_FILE):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def _int(node_config: Mapping[str, Any], key: str) -> int | None:
    value = node_config.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node-config {key}={value!r} is not an integer") from None


def identity_from_node_config(node_config: Mapping[str, Any], node_id: int, run_id: str) -> TrainerIdentity:
    """The trainer a SuperNode's node-config describes; ``ConfigError`` names a bad key."""
    trainer_id = str(node_config.get("trainer-id") or f"node-{node_id}")
    num_devices = _int(node_config, "num-devices")
    work_dir, data_path, device = node_config.get("work-dir"), node_config.get("data-path"), node_config.get("device")
    return TrainerIdentity(
        trainer_id=trainer_id,
        node_id=int(node_id),
        work_dir=Path(str(work_dir)) if work_dir else default_work_dir(run_id, trainer_id),
        data_path=Path(str(data_path)) if data_path else None,
        device=str(device) if device else None,
        partition_id=_int(node_config, "partition-id"),
        num_partitions=_int(node_config, "num-partitions"),
        num_devices=1 if num_devices is None else num_devices,
    )
