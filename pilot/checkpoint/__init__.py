"""Checkpoints: named safetensors tensor groups plus a JSON sidecar, written atomically.

A checkpoint is a directory::

    round_00012/
        model.safetensors           the weights (tensor group "model")
        outer_momentum.safetensors  any further named group (optimiser state, momentum...)
        checkpoint.json             the sidecar, written last: metadata + size/sha256 per tensor file

Guarantees:

- Atomic: everything is written into a hidden staging directory beside the
  target (``.round_00012.tmp-<pid>-<nonce>``), each file fsync'd, the sidecar
  last, then the directory is renamed into place and the parent fsync'd. A
  write killed half-way leaves only the hidden staging directory; the previous
  checkpoint stays intact and ``latest_checkpoint`` still returns it.
  ``overwrite=True`` moves an existing checkpoint aside to
  ``.<name>.old-<pid>-<nonce>``, renames the new one in, then deletes the old.
- Verified: loading checks every file's size and sha256 before reading tensors,
  and a mismatch, missing/truncated file, invalid sidecar or a model config other
  than ``expect_model_config`` raises ``CheckpointError`` naming the file or keys.
- No pickle: tensors are safetensors, metadata is JSON. bf16 round-trips exactly.

Modules: ``meta`` (sidecar dataclasses and parsing), ``store`` (save / load /
verify), ``rundir`` (round naming, latest, prune). Import from here::

    from pilot.checkpoint import CheckpointMeta, save_checkpoint, load_checkpoint
"""

from __future__ import annotations

from pilot.checkpoint.meta import (
    CHECKPOINTS_SUBDIR,
    DEFAULT_GROUP,
    FORMAT_VERSION,
    SIDECAR_NAME,
    Checkpoint,
    CheckpointMeta,
    TensorFile,
    TensorInfo,
    TokenizerIdentity,
    check_model_config,
    checkpoint_dir_of,
    read_checkpoint_meta,
    read_tensor_index,
)
from pilot.checkpoint.rundir import (
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    round_checkpoint_path,
)
from pilot.checkpoint.store import load_checkpoint, save_checkpoint, verify_checkpoint
from pilot.hashing import sha256_file

__all__ = [
    "CHECKPOINTS_SUBDIR",
    "DEFAULT_GROUP",
    "FORMAT_VERSION",
    "SIDECAR_NAME",
    "Checkpoint",
    "CheckpointMeta",
    "TensorFile",
    "TensorInfo",
    "TokenizerIdentity",
    "check_model_config",
    "checkpoint_dir_of",
    "checkpoints_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_checkpoint_meta",
    "read_tensor_index",
    "round_checkpoint_path",
    "save_checkpoint",
    "sha256_file",
    "verify_checkpoint",
]
