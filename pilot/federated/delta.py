"""Pseudo-gradients and the tensor-dict arithmetic the rest of ``pilot.federated`` shares.

What this module does:
- ``pseudo_gradient``: the trainer's reply, Δ = W_round − W_local per tensor, in fp32 (the direction the outer
  optimiser treats as a gradient: W ← W − lr·Δ moves the global weights towards the trainer's).
- ``global_norm``: the L2 norm over every tensor of a state dict, accumulated in float64 (validation bounds it).
- ``check_same_keys``: the one place that words "missing / unexpected tensor" errors.

A "state" here is a ``Mapping[str, Tensor]`` keyed by parameter name, as ``GPT.state_dict()`` returns it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from pilot.errors import BadUpdate

StateDict = Mapping[str, Tensor]


def check_same_keys(got: Iterable[str], expected: Iterable[str], *, what: str,
                    error: type[Exception] = BadUpdate) -> None:
    """Raise ``error`` naming the first missing or unexpected tensor when the two name sets differ."""
    got_set, expected_set = set(got), set(expected)
    missing = sorted(expected_set - got_set)
    extra = sorted(got_set - expected_set)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise error(f"{what}: tensor {missing[0]!r} is missing{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise error(f"{what}: unexpected tensor {extra[0]!r}{more}")


def pseudo_gradient(global_state: StateDict, local_state: StateDict,
                    device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Δ = W_round − W_local for every tensor, as contiguous fp32 tensors on ``device`` (``global_state``'s order).

    Both states must hold the same names and shapes (else ``ValueError``: this is the trainer's own bug, not a
    bad reply). Inputs of any floating dtype or device are accepted; the subtraction happens in fp32.
    """
    check_same_keys(local_state.keys(), global_state.keys(), what="pseudo_gradient: local state",
                    error=ValueError)
    delta: dict[str, Tensor] = {}
    for name, start in global_state.items():
        end = local_state[name]
        if tuple(start.shape) != tuple(end.shape):
            raise ValueError(f"pseudo_gradient: tensor {name!r} has shape {tuple(end.shape)} locally "
                             f"but {tuple(start.shape)} globally")
        start32 = start.detach().to(device=device, dtype=torch.float32)
        end32 = end.detach().to(device=device, dtype=torch.float32)
        delta[name] = (start32 - end32).contiguous()
    return delta


def global_norm(state: StateDict) -> float:
    """‖state‖₂ over all tensors: per-tensor fp32 norms combined in float64 (inf/nan propagate)."""
    total = 0.0
    for tensor in state.values():
        if tensor.numel() == 0:
            continue
        part = float(torch.linalg.vector_norm(tensor.detach().float()))
        total += part * part
    return math.sqrt(total)


def numel(state: StateDict) -> int:
    """Total number of elements over all tensors."""
    return sum(int(t.numel()) for t in state.values())
