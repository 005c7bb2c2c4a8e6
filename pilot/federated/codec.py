"""Encoding a trainer's pseudo-gradient for the wire: fp32, bf16, or int8 with error feedback.

What this module does:
- ``UpdateCodec(kind, block_size)``: the encoding both ends agree on (the coordinator puts it in the round config).
    - ``fp32``: exact; 4 bytes per element.
    - ``bf16``: round-to-nearest-even to bfloat16; 2 bytes per element. Carried as its raw 16-bit patterns in an
      ``int16`` numpy array, because numpy has no bfloat16 and Flower's ``Array`` serialises with ``np.save``.
    - ``int8``: symmetric absmax quantisation with one fp32 scale per block of ``block_size`` consecutive elements
      (row-major order; ``None`` = one scale per tensor): ``scale = absmax / 127``, ``q = round(x / scale)``
      (round half to even) in [−127, 127], decoded as ``q · scale``; so ``|x − x̂| ≤ scale / 2`` per element.
      About 1 + 4/block_size bytes per element.
- Error feedback (lossy kinds): ``encode(delta, residual)`` encodes ``Δ + r`` and returns the new residual
  ``r' = (Δ + r) − decode(encode(Δ + r))``, which the trainer keeps (``pilot.federated.residual``) and adds to
  next round's Δ, so what quantisation drops is sent later instead of lost.
- ``EncodedUpdate``: the arrays (numpy, ready for a Flower ``ArrayRecord``) plus flat metadata (encoding, block
  size, format version, tensor names: values a Flower ``ConfigRecord`` holds). Construction checks the structure
  (every tensor present, dtypes, scale counts, finite non-negative scales) and raises ``BadUpdate`` naming the
  tensor, so a malformed reply never reaches ``decode``.

Array keys: the tensor name for the payload; int8 adds ``<name>::scale`` (float32, one per block).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pilot.errors import BadUpdate, ConfigError
from pilot.federated.delta import StateDict, check_same_keys

EncodingKind = Literal["fp32", "bf16", "int8"]
ENCODINGS: tuple[str, ...] = ("fp32", "bf16", "int8")
FORMAT_VERSION = 1
SCALE_SUFFIX = "::scale"
INT8_MAX = 127
# numpy dtype of the payload array per encoding (bf16 travels as its bit patterns)
PAYLOAD_DTYPES: dict[str, np.dtype[Any]] = {
    "fp32": np.dtype(np.float32), "bf16": np.dtype(np.int16), "int8": np.dtype(np.int8),
}
SCALE_DTYPE = np.dtype(np.float32)
METADATA_KEYS = ("encoding", "block_size", "format_version", "names")


def num_blocks(numel: int, block_size: int | None) -> int:
    """Scales an int8 tensor of ``numel`` elements carries (``None`` = per tensor: 1, or 0 when empty)."""
    if numel == 0:
        return 0
    return 1 if block_size is None else math.ceil(numel / block_size)


def _blocks_view(flat: Tensor, blocks: int, width: int) -> Tensor:
    """``flat`` as ``[blocks, width]``, zero-padded at the end only when it does not fill the last block."""
    pad = blocks * width - flat.numel()
    return (F.pad(flat, (0, pad)) if pad else flat).view(blocks, width)


def quantize_int8(x: Tensor, block_size: int | None) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantisation of ``x`` (fp32): ``(q shaped like x, scales float32[num_blocks])``.

    A non-finite element makes its block's scale non-finite (callers check the scales).
    """
    n = x.numel()
    blocks = num_blocks(n, block_size)
    if blocks == 0:
        empty_scale = torch.zeros(0, dtype=torch.float32, device=x.device)
        return torch.zeros(x.shape, dtype=torch.int8, device=x.device), empty_scale
    view = _blocks_view(x.reshape(-1), blocks, block_size or n)
    low, high = torch.aminmax(view, dim=1)  # one pass, no |x| copy
    scale = torch.maximum(high, low.neg()).div_(INT8_MAX)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block encodes as q = 0
    scaled = view / divisor[:, None]
    q = scaled.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.view(-1)[:n].view(x.shape), scale


def dequantize_int8(q: Tensor, scale: Tensor, block_size: int | None) -> Tensor:
    """Inverse of :func:`quantize_int8`: ``q · scale`` per block, fp32, shaped like ``q``."""
    n = q.numel()
    blocks = scale.numel()
    if blocks == 0:
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    values = _blocks_view(q.reshape(-1).to(torch.float32, copy=True), blocks, block_size or n)
    return values.mul_(scale[:, None]).view(-1)[:n].view(q.shape)


def _as_numpy(value: Any, key: str) -> np.ndarray:
    """A numpy view of a numpy array or CPU tensor (bf16 tensors become their int16 bit patterns)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        return tensor.numpy()
    raise BadUpdate(f"array {key!r} is a {type(value).__name__}, not a numpy array or tensor")


def _to_torch(array: np.ndarray) -> Tensor:
    """A tensor over ``array`` (copied first when numpy marks it read-only, e.g. a frombuffer view)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@dataclass(frozen=True)
class EncodedUpdate:
    """One encoded pseudo-gradient: numpy arrays + flat metadata, structurally checked on construction."""

    kind: str  # one of ENCODINGS
    block_size: int | None  # int8 elements per scale; None = per tensor (always None for fp32 / bf16)
    names: tuple[str, ...]  # tensor names, in the sender's order
    arrays: Mapping[str, np.ndarray] = field(repr=False)  # payload per name (+ "<name>::scale" for int8)

    def __post_init__(self) -> None:
        if self.kind not in ENCODINGS:
            raise BadUpdate(f"unknown update encoding {self.kind!r}; expected one of {', '.join(ENCODINGS)}")
        if self.block_size is not None and (self.kind != "int8" or self.block_size < 1):
            raise BadUpdate(f"block_size {self.block_size!r} is invalid for a {self.kind} update")
        if not self.names or len(set(self.names)) != len(self.names):
            raise BadUpdate("update metadata: tensor names are empty or repeated")
        expected = set(self.names)
        if self.kind == "int8":
            expected |= {name + SCALE_SUFFIX for name in self.names}
        check_same_keys(self.arrays.keys(), expected, what=f"{self.kind} update")
        for name in self.names:
            self._check_tensor(name)

    def _check_tensor(self, name: str) -> None:
        payload = self.arrays[name]
        if not isinstance(payload, np.ndarray):
            raise BadUpdate(f"tensor {name!r}: payload is a {type(payload).__name__}, not a numpy array")
        want = PAYLOAD_DTYPES[self.kind]
        if payload.dtype != want:
            raise BadUpdate(f"tensor {name!r}: payload dtype {payload.dtype} is not {want} ({self.kind} update)")
        if self.kind != "int8":
            return
        scale = self.arrays[name + SCALE_SUFFIX]
        blocks = num_blocks(int(payload.size), self.block_size)
        if not isinstance(scale, np.ndarray) or scale.dtype != SCALE_DTYPE or scale.shape != (blocks,):
            got = f"{scale.dtype}{list(scale.shape)}" if isinstance(scale, np.ndarray) else type(scale).__name__
            raise BadUpdate(f"tensor {name!r}: scales are {got}, expected float32[{blocks}] "
                            f"for {payload.size} elements at block size {self.block_size or 'per-tensor'}")
        if blocks and not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise BadUpdate(f"tensor {name!r}: scales must be finite and non-negative")

    @property
    def num_bytes(self) -> int:
        """Payload bytes: the sum of the arrays' ``nbytes`` (Flower adds ~130 bytes of framing per array)."""
        return sum(int(a.nbytes) for a in self.arrays.values())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to put in a Flower ``ArrayRecord`` (``Array(ndarray)`` per key)."""
        return dict(self.arrays)

    def metadata(self) -> dict[str, int | str | list[str]]:
        """Flat values for a Flower ``ConfigRecord`` (str / int / list of str)."""
        return {"encoding": self.kind, "block_size": self.block_size or 0,
                "format_version": FORMAT_VERSION, "names": list(self.names)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> EncodedUpdate:
        """Rebuild from received arrays (numpy or tensors) and metadata; ``BadUpdate`` says what is malformed."""
        missing = [key for key in METADATA_KEYS if key not in metadata]
        if missing:
            raise BadUpdate(f"update metadata lacks {', '.join(missing)}")
        version = metadata["format_version"]
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise BadUpdate(f"update format_version {version!r} is not {FORMAT_VERSION}")
        kind, block, names = metadata["encoding"], metadata["block_size"], metadata["names"]
        if not isinstance(kind, str):
            raise BadUpdate(f"update metadata: encoding {kind!r} is not a string")
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise BadUpdate(f"update metadata: block_size {block!r} is not an integer >= 0")
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise BadUpdate("update metadata: names must be a list of strings")
        numpy_arrays = {str(key): _as_numpy(value, str(key)) for key, value in arrays.items()}
        return cls(kind=kind, block_size=block or None, names=tuple(names), arrays=numpy_arrays)


@dataclass(frozen=True)
class UpdateCodec:
    """The update encoding of a run; ``encode`` on the trainer, ``decode`` on the coordinator."""

    kind: EncodingKind = "fp32"  # fp32 | bf16 | int8
    block_size: int | None = None  # int8: elements per scale (e.g. 256); None = one scale per tensor

    def __post_init__(self) -> None:
        if self.kind not in ENCODINGS:
            raise ConfigError(f"UpdateCodec.kind must be one of {', '.join(ENCODINGS)}, got {self.kind!r}")
        block = self.block_size
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ConfigError(f"UpdateCodec.block_size must be a positive integer or None, got {block!r}")
        if self.kind != "int8":
            object.__setattr__(self, "block_size", None)  # only int8 has blocks

    @property
    def lossy(self) -> bool:
        """Whether decoding loses information (then ``encode`` returns an error-feedback residual)."""
        return self.kind != "fp32"

    def encode(self, delta: StateDict, residual: StateDict | None = None,
               ) -> tuple[EncodedUpdate, dict[str, Tensor] | None]:
        """Encode ``delta + residual``; return it with the new residual (``None`` for lossless fp32).

        ``residual`` (from the previous round, or ``None``) must hold the same tensor names and shapes.
        The work happens on each Δ tensor's device (a GPU trainer quantises there and copies only the int8
        payload to the host); the arrays are host numpy, the new residual stays on Δ's device.
        A non-finite value raises ``BadUpdate`` naming the tensor: the trainer must not send it, nor keep
        it in its residual.
        """
        if residual is not None:
            check_same_keys(residual.keys(), delta.keys(), what="error-feedback residual", error=ValueError)
        arrays: dict[str, np.ndarray] = {}
        new_residual: dict[str, Tensor] = {}
        for name, tensor in delta.items():
            target = tensor.detach().to(dtype=torch.float32)  # may share the caller's storage
            if residual is not None:  # then target is a fresh sum, ours to overwrite with the new residual
                carried = residual[name]
                if carried.shape != tensor.shape:  # never let broadcasting hide a stale residual
                    raise ValueError(f"error-feedback residual {name!r} has shape {tuple(carried.shape)}, "
                                     f"the update {tuple(tensor.shape)}")
                target = target + carried.detach().to(device=target.device, dtype=torch.float32)
            target = target.contiguous()
            if self.kind == "int8":
                q, scale = quantize_int8(target, self.block_size)
                _check_finite(name, scale)  # absmax per block: non-finite iff the block is
                arrays[name], arrays[name + SCALE_SUFFIX] = q.cpu().numpy(), scale.cpu().numpy()
                decoded = dequantize_int8(q, scale, self.block_size)
            else:
                _check_finite(name, torch.stack(torch.aminmax(target)) if target.numel() else target)
                if self.kind == "fp32":
                    arrays[name] = target.cpu().numpy()
                    continue
                low = target.to(torch.bfloat16)
                arrays[name] = low.view(torch.int16).cpu().numpy()
                decoded = low.to(torch.float32)
            new_residual[name] = target.sub_(decoded) if residual is not None else target - decoded
        encoded = EncodedUpdate(kind=self.kind, block_size=self.block_size, names=tuple(delta.keys()),
                                arrays=arrays)
        return encoded, (new_residual if self.lossy else None)

    def decode(self, encoded: EncodedUpdate) -> dict[str, Tensor]:
        """The fp32 Δ an update carries (fp32 payloads are shared, not copied).

        Raises ``BadUpdate`` when the update's encoding or block size is not this codec's.
        """
        if (encoded.kind, encoded.block_size) != (self.kind, self.block_size):
            raise BadUpdate(f"update is {_describe(encoded.kind, encoded.block_size)}, "
                            f"but this run expects {_describe(self.kind, self.block_size)}")
        out: dict[str, Tensor] = {}
        for name in encoded.names:
            payload = _to_torch(encoded.arrays[name])
            if self.kind == "fp32":
                out[name] = payload
            elif self.kind == "bf16":
                out[name] = payload.view(torch.bfloat16).to(torch.float32)
            else:
                scale = _to_torch(encoded.arrays[name + SCALE_SUFFIX])
                out[name] = dequantize_int8(payload, scale, self.block_size)
        return out


def _check_finite(name: str, reduced: Tensor) -> None:
    if not bool(torch.isfinite(reduced).all()):
        raise BadUpdate(f"tensor {name!r} has non-finite values; refusing to encode it")


def _describe(kind: str, block_size: int | None) -> str:
    if kind != "int8":
        return kind
    return f"int8 (block {block_size})" if block_size else "int8 (per-tensor scale)"
