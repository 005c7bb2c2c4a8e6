"""The outer optimiser: how the coordinator turns the round's mean pseudo-gradient into new global weights.

The mean Δ̄ (``pilot.federated.aggregate``) is used as a gradient for SGD on the global weights, with exactly
``torch.optim.SGD`` semantics (dampening 0, no weight decay; the first step's buffer is Δ̄ itself):

    buf ← μ·buf + Δ̄                         (momentum > 0)
    d   ← Δ̄ + μ·buf  (Nesterov)  |  buf  |  Δ̄ (no momentum)
    W   ← W − lr·d

- ``fedavg``: lr 1, no momentum, so W ← W − Δ̄ = the token-weighted mean of the trainers' weights.
- ``diloco``: Nesterov, lr 0.7, momentum 0.9 (DiLoCo, Douillard et al. 2023; OpenDiLoCo's outer optimiser).

``OuterConfig(kind)`` fills these defaults; ``lr`` / ``momentum`` / ``nesterov`` override them. The momentum
buffer is the optimiser's only state: ``state_tensors()`` returns it (fp32, keyed by parameter name) for the
coordinator's checkpoint (its own tensor group), ``load_state_tensors()`` restores it, so a restarted coordinator
takes bit-identical steps. Pure torch on CPU, deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pilot.errors import CheckpointError, ConfigError
from pilot.federated.delta import StateDict, check_same_keys

OuterKind = Literal["fedavg", "diloco"]
OUTER_KINDS: tuple[str, ...] = ("fedavg", "diloco")
# (lr, momentum, nesterov) per kind
OUTER_DEFAULTS: dict[str, tuple[float, float, bool]] = {"fedavg": (1.0, 0.0, False), "diloco": (0.7, 0.9, True)}


@dataclass(frozen=True)
class OuterConfig:
    """Outer SGD settings; ``None`` fields take the kind's defaults."""

    kind: OuterKind = "diloco"  # fedavg | diloco
    lr: float | None = None  # outer learning rate (fedavg 1.0, diloco 0.7)
    momentum: float | None = None  # μ in [0, 1) (fedavg 0.0, diloco 0.9); fedavg allows only 0
    nesterov: bool | None = None  # Nesterov momentum (fedavg False, diloco True); needs momentum > 0

    def __post_init__(self) -> None:
        if self.kind not in OUTER_KINDS:
            raise ConfigError(f"OuterConfig.kind must be one of {', '.join(OUTER_KINDS)}, got {self.kind!r}")
        lr, momentum, nesterov = OUTER_DEFAULTS[self.kind]
        for name, default in (("lr", lr), ("momentum", momentum), ("nesterov", nesterov)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not (
                math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"OuterConfig.lr must be a positive finite number, got {self.lr!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, int | float) or not (
                0.0 <= self.momentum < 1.0):
            raise ConfigError(f"OuterConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"OuterConfig.nesterov must be a bool, got {self.nesterov!r}")
        if self.kind == "fedavg" and (self.momentum != 0.0 or self.nesterov):
            raise ConfigError("OuterConfig.momentum must be 0 (and nesterov false) for kind 'fedavg'; "
                              "use kind 'diloco' for outer momentum")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("OuterConfig.nesterov needs momentum > 0")


class OuterOptimizer:
    """SGD (optionally Nesterov momentum) on the global weights, with Δ̄ as the gradient."""

    def __init__(self, config: OuterConfig) -> None:
        self.config = config
        self._buffers: dict[str, Tensor] = {}  # momentum per parameter; empty before the first step

    @property
    def uses_momentum(self) -> bool:
        return float(self.config.momentum or 0.0) > 0.0

    def step(self, global_state: StateDict, mean_delta: StateDict) -> dict[str, Tensor]:
        """New global weights W − lr·d (fp32 CPU tensors; the inputs are not modified).

        Call only for a round with valid replies: a round without (``mean_delta is None``) keeps the old
        weights and leaves the momentum alone.
        """
        check_same_keys(mean_delta.keys(), global_state.keys(), what="outer step: mean update", error=ValueError)
        lr, momentum = float(self.config.lr or 0.0), float(self.config.momentum or 0.0)
        if self._buffers:
            check_same_keys(self._buffers.keys(), global_state.keys(), what="outer step: momentum buffer",
                            error=ValueError)
        for name, weights in global_state.items():  # all checks before any buffer changes
            if mean_delta[name].shape != weights.shape:
                raise ValueError(f"outer step: tensor {name!r} update shape {tuple(mean_delta[name].shape)} "
                                 f"!= weights shape {tuple(weights.shape)}")
        new_state: dict[str, Tensor] = {}
        for name, weights in global_state.items():
            grad = mean_delta[name].detach().to(device="cpu", dtype=torch.float32)
            if momentum > 0.0:
                buf = self._buffers.get(name)
                if buf is None:  # torch.optim.SGD: the first buffer is the gradient itself
                    buf = grad.clone()
                    self._buffers[name] = buf
                else:
                    buf.mul_(momentum).add_(grad)
                grad = grad.add(buf, alpha=momentum) if self.config.nesterov else buf
            w = weights.detach().to(device="cpu", dtype=torch.float32)
            new_state[name] = w.add(grad, alpha=-lr)
        return new_state

    def state_tensors(self) -> dict[str, Tensor]:
        """The momentum buffers (fp32, by parameter name; empty for fedavg or before the first step)."""
        return {name: buf.clone() for name, buf in self._buffers.items()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor],
                           expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """Restore buffers saved by ``state_tensors``; ``CheckpointError`` if they do not fit the model."""
        if tensors and not self.uses_momentum:
            raise CheckpointError(f"outer optimiser {self.config.kind!r} has no momentum, "
                                  f"but the checkpoint holds {len(tensors)} momentum tensors")
        if tensors and expected_shapes is not None:
            check_same_keys(tensors.keys(), expected_shapes.keys(), what="outer momentum", error=CheckpointError)
            for name, shape in expected_shapes.items():
                if tuple(tensors[name].shape) != tuple(shape):
                    raise CheckpointError(f"outer momentum {name!r} has shape {tuple(tensors[name].shape)}, "
                                          f"the model's is {tuple(shape)}")
        for name, tensor in tensors.items():
            if tensor.dtype != torch.float32:
                raise CheckpointError(f"outer momentum {name!r} is {tensor.dtype}, expected torch.float32")
        self._buffers = {name: t.detach().to("cpu").clone().contiguous() for name, t in tensors.items()}
