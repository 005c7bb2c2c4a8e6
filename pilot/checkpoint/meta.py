"""The checkpoint sidecar: metadata dataclasses, JSON (de)serialisation and validation.

``CheckpointMeta`` is what ``checkpoint.json`` holds: format version, kind,
round/step, tokens seen, model config (a plain dict), tokenizer identity,
free-form ``extra`` metadata, creation time, and per tensor group its file name,
size, sha256 and tensor count. ``read_checkpoint_meta`` parses and validates a
sidecar without touching tensors; ``read_tensor_index`` lists a safetensors
file's tensors from its header alone. Nothing here imports torch at runtime.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pilot.errors import CheckpointError

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "pilot-checkpoint"
FORMAT_VERSION = 1
SIDECAR_NAME = "checkpoint.json"
TENSOR_SUFFIX = ".safetensors"
DEFAULT_GROUP = "model"
CHECKPOINTS_SUBDIR = "checkpoints"
KINDS = ("model", "round")

GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MISSING = object()


@dataclass(frozen=True)
class TokenizerIdentity:
    """Which tokenizer a model was trained with."""

    name: str
    sha256: str


@dataclass(frozen=True)
class TensorFile:
    """One tensor group's file as recorded in the sidecar."""

    file: str  # plain file name inside the checkpoint directory
    sha256: str  # hex sha256 of the whole file
    size: int  # bytes
    tensors: int  # number of tensors stored in it


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything the sidecar says about a checkpoint.

    Build one with kind/round-or-step/tokens/model_config (and optionally
    tokenizer and extra); ``save_checkpoint`` fills in ``created_at`` and
    ``files``.
    """

    kind: Literal["model", "round"]
    model_config: dict[str, Any]  # dataclasses.asdict(GPTConfig), JSON-serialisable
    round: int | None = None  # required for kind "round"
    step: int | None = None  # optimiser steps so far, when meaningful
    tokens_seen: int = 0
    tokenizer: TokenizerIdentity | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # optimiser name, cursor, ...
    created_at: str = ""  # UTC ISO 8601, set by save_checkpoint
    files: dict[str, TensorFile] = field(default_factory=dict)  # set by save_checkpoint
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"checkpoint kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "round" and self.round is None:
            raise CheckpointError("a 'round' checkpoint needs its round number")
        for name in ("round", "step", "tokens_seen"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise CheckpointError(f"checkpoint {name} must be a non-negative int, got {value!r}")
        if not isinstance(self.model_config, dict):
            raise CheckpointError(
                f"model_config must be a plain dict (dataclasses.asdict), got {type(self.model_config).__name__}"
            )
        for name in ("model_config", "extra"):
            try:
                json.dumps(getattr(self, name), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint {name} is not JSON-serialisable: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON object."""
        body = dataclasses.asdict(self)
        body.pop("format_version")
        return {"format": FORMAT_NAME, "format_version": self.format_version, **body}

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> CheckpointMeta:
        """Parse a sidecar object; ``source`` names it in error messages."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{source} is not a Pilot checkpoint sidecar (format != {FORMAT_NAME!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source} has format_version {version!r}; this Pilot reads {FORMAT_VERSION}")
        try:
            tokenizer = data.get("tokenizer")
            files = {
                str(group): TensorFile(
                    file=str(entry["file"]),
                    sha256=str(entry["sha256"]),
                    size=int(entry["size"]),
                    tensors=int(entry["tensors"]),
                )
                for group, entry in dict(data["files"]).items()
            }
            return cls(
                kind=data["kind"],
                model_config=data["model_config"],
                round=data.get("round"),
                step=data.get("step"),
                tokens_seen=data.get("tokens_seen", 0),
                tokenizer=TokenizerIdentity(**tokenizer) if tokenizer is not None else None,
                extra=data.get("extra") or {},
                created_at=str(data.get("created_at", "")),
                files=files,
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{source} has a missing or malformed field: {exc!r}") from exc


@dataclass
class Checkpoint:
    """A loaded checkpoint: its metadata and tensors by group name."""

    path: Path
    meta: CheckpointMeta
    tensors: dict[str, dict[str, torch.Tensor]]

    def group(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.tensors:
            raise CheckpointError(f"checkpoint {self.path} has no tensor group {name!r} (has {sorted(self.tensors)})")
        return self.tensors[name]

    @property
    def model(self) -> dict[str, torch.Tensor]:
        """The ``model`` group: a state dict for ``model.load_state_dict``."""
        return self.group(DEFAULT_GROUP)



def read_checkpoint_meta(path: str | Path) -> CheckpointMeta:
    """Parse and validate the sidecar only (no hashing, no tensors)."""
    directory = checkpoint_dir_of(path)
    sidecar = directory / SIDECAR_NAME
    if not directory.is_dir():
        backups = sorted(directory.parent.glob(f".{directory.name}.old-*")) if directory.parent.is_dir() else []
        hint = f"; an interrupted overwrite left the previous copy at {backups[-1]}" if backups else ""
        raise CheckpointError(f"checkpoint not found: {directory}{hint}")
    if not sidecar.is_file():
        raise CheckpointError(f"incomplete checkpoint {directory}: no {SIDECAR_NAME} sidecar")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON: {exc}") from exc
    meta = CheckpointMeta.from_dict(data, source=str(sidecar))
    for group, entry in meta.files.items():
        if Path(entry.file).name != entry.file or entry.file in ("", ".", ".."):
            raise CheckpointError(f"checkpoint sidecar {sidecar}: group {group!r} names a bad file {entry.file!r}")
    return meta


def check_model_config(meta: CheckpointMeta, expected: Mapping[str, Any], *, source: str) -> None:
    """Raise CheckpointError naming every key where the stored config differs from ``expected``."""
    normalised = json.loads(json.dumps(dict(expected)))  # tuples -> lists, as stored
    stored = meta.model_config
    differing = sorted(k for k in set(stored) | set(normalised) if stored.get(k, _MISSING) != normalised.get(k, _MISSING))
    if differing:
        details = "; ".join(
            f"{k}: checkpoint has {stored.get(k, '<absent>')!r}, expected {normalised.get(k, '<absent>')!r}"
            for k in differing
        )
        raise CheckpointError(f"checkpoint {source} is for another model config ({details})")



@dataclass(frozen=True)
class TensorInfo:
    """One tensor as listed in a safetensors header."""

    dtype: str  # safetensors dtype code: F32, BF16, I64, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def read_tensor_index(file_path: str | Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes in a safetensors file, read from its header only."""
    file_path = Path(file_path)
    try:
        with open(file_path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"tensor file {file_path} is truncated (no header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_MAX_HEADER_BYTES, file_path.stat().st_size - 8):
                raise CheckpointError(f"tensor file {file_path} has a bad header length {length}")
            header = json.loads(handle.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read header of tensor file {file_path}: {exc}") from exc
    return {
        name: TensorInfo(dtype=str(info["dtype"]), shape=tuple(int(d) for d in info["shape"]))
        for name, info in header.items()
        if name != "__metadata__"
    }


def checkpoint_dir_of(path: str | Path) -> Path:
    """Accept a checkpoint directory or the path of its sidecar."""
    path = Path(path)
    return path.parent if path.name == SIDECAR_NAME and path.is_file() else path
