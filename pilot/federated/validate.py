"""Validation of a trainer's reply before it may touch the global weights.

The coordinator decodes each reply (``UpdateCodec.decode``), then calls:
- ``validate_update(delta, expected_shapes, limits, weights_norm=...)``: exactly the expected tensors (no
  missing, no extra), each of the expected shape and dtype (fp32), every value finite, and the global L2 norm
  within ``UpdateLimits`` (an absolute bound and/or a bound relative to ‖W_r‖₂). Returns ``UpdateStats``.
- ``validate_metrics(metrics)``: the reply's metrics are numbers (or lists of numbers), all finite, and the token
  count (the aggregation weight) is a positive integer. Returns the token count.

Each failure raises ``BadUpdate`` whose message names the tensor or metric and the reason; the coordinator logs
it, rejects that reply and closes the round with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pilot.errors import BadUpdate, ConfigError
from pilot.federated.delta import StateDict, check_same_keys, global_norm

TOKENS_METRIC = "tokens"  # the reply metric that weights a reply in the mean


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds on a reply's pseudo-gradient norm (``None`` = unbounded)."""

    max_norm: float | None = None  # reject when ‖Δ‖₂ exceeds this
    max_rel_norm: float | None = None  # reject when ‖Δ‖₂ / ‖W_r‖₂ exceeds this (needs weights_norm)

    def __post_init__(self) -> None:
        for name in ("max_norm", "max_rel_norm"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value > 0):
                raise ConfigError(f"UpdateLimits.{name} must be a positive finite number or None, got {value!r}")


@dataclass(frozen=True)
class UpdateStats:
    """What validation measured on an accepted reply."""

    norm: float  # ‖Δ‖₂ over all tensors
    numel: int  # elements over all tensors
    rel_norm: float | None  # ‖Δ‖₂ / ‖W_r‖₂ when weights_norm was given (and > 0)


def validate_update(
    delta: StateDict,
    expected_shapes: Mapping[str, tuple[int, ...]],
    limits: UpdateLimits = UpdateLimits(),
    *,
    weights_norm: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> UpdateStats:
    """Check a decoded Δ against the model's shapes and ``limits``; ``BadUpdate`` names what is wrong."""
    if limits.max_rel_norm is not None and weights_norm is None:
        raise ValueError("validate_update: limits.max_rel_norm needs weights_norm (‖W_r‖₂)")
    check_same_keys(delta.keys(), expected_shapes.keys(), what="update")
    numel = 0
    for name, want in expected_shapes.items():
        tensor = delta[name]
        if tuple(tensor.shape) != tuple(want):
            raise BadUpdate(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(want)}")
        if tensor.dtype != dtype:
            raise BadUpdate(f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nans = int(torch.isnan(tensor).sum())
            infs = int((~finite).sum()) - nans
            raise BadUpdate(f"tensor {name!r} has non-finite values ({nans} NaN, {infs} Inf)")
        numel += int(tensor.numel())
    norm = global_norm(delta)
    if not math.isfinite(norm):  # finite elements whose squares overflow fp32
        raise BadUpdate(f"update norm overflows (elements too large); largest tensor: {_largest(delta)!r}")
    if limits.max_norm is not None and norm > limits.max_norm:
        raise BadUpdate(f"update norm {norm:.6g} exceeds max_norm {limits.max_norm:.6g} "
                        f"(largest tensor: {_largest(delta)!r})")
    rel_norm = norm / weights_norm if weights_norm else None
    if limits.max_rel_norm is not None and rel_norm is not None and rel_norm > limits.max_rel_norm:
        raise BadUpdate(f"update norm {norm:.6g} is {rel_norm:.6g} × the weights' norm, above max_rel_norm "
                        f"{limits.max_rel_norm:.6g} (largest tensor: {_largest(delta)!r})")
    return UpdateStats(norm=norm, numel=numel, rel_norm=rel_norm)


def _largest(delta: StateDict) -> str:
    """The tensor with the largest L2 norm (named in norm errors, to point at the culprit)."""
    return max(delta, key=lambda name: float(torch.linalg.vector_norm(delta[name].float())))


def validate_metrics(metrics: Mapping[str, Any], *, tokens_key: str = TOKENS_METRIC) -> int:
    """Check a reply's metrics (finite numbers, positive integer token count); return the token count."""
    for key, value in metrics.items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise BadUpdate(f"metric {key!r} is {item!r}, not a number")
            if not math.isfinite(item):
                raise BadUpdate(f"metric {key!r} is not finite ({item!r})")
    if tokens_key not in metrics:
        raise BadUpdate(f"metric {tokens_key!r} (tokens trained, the aggregation weight) is missing")
    tokens = metrics[tokens_key]
    if isinstance(tokens, float) and tokens.is_integer():
        tokens = int(tokens)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise BadUpdate(f"metric {tokens_key!r} must be a positive integer, got {metrics[tokens_key]!r}")
    return tokens
