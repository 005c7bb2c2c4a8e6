"""Inner optimisers, the learning-rate schedule, and optimiser state as plain tensors.

What this module does:
- ``OptimConfig``: which optimiser and its hyper-parameters, validated on construction (``ConfigError`` names
  the bad field).
    - kind "muon" (nanochat's split): ``Muon`` for the 2-D block matrices, AdamW for the embedding and the
      unembedding, AdamW lrs scaled by (n_embd / 768) ** -0.5.
    - kind "adamw": one AdamW over every parameter at ``lr`` (the Flower Tiny-Shakespeare example).
- ``Muon``: SGD momentum (Nesterov) whose update is orthogonalised by a quintic Newton–Schulz iteration
  (bf16 on CUDA, fp32 elsewhere; one batched iteration per distinct matrix shape) and scaled by
  max(1, rows/cols) ** 0.5. Under DDP the gradients are already
  all-reduced before ``step()``, so every rank runs this same optimiser on the same gradients: one code path
  with and without a process group.
- ``build_optimizers(model, cfg)``: the optimiser list; every param group records its ``initial_lr``.
- ``LRSchedule``: warmup → constant → linear warmdown to ``final_lr_frac``, held there past ``total_steps``
  (never lower, never negative).
- ``apply_lr(optimizers, multiplier, step)``: sets every group's lr (and Muon's momentum warmup 0.85 → 0.95).
- ``optimizer_state_tensors`` / ``load_optimizer_state_tensors``: the optimisers' state as a flat
  ``{name: Tensor}`` dict (safetensors-ready, no pickle), names like ``opt0.state.3.exp_avg``.

Per step the training loop does: ``apply_lr(opts, schedule.multiplier(step), step)``, backward,
``for o in opts: o.step()``, ``model.zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pilot.errors import CheckpointError, ConfigError
from pilot.model import GPT

OPTIMIZER_KINDS = ("muon", "adamw")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton–Schulz coefficients (Keller Jordan / nanochat)


@dataclass(frozen=True)
class OptimConfig:
    kind: str = "muon"  # "muon" (Muon matrices + AdamW embeddings) or "adamw" (AdamW on everything)
    embedding_lr: float = 0.2  # muon kind: AdamW lr of wte (before the width scaling)
    unembedding_lr: float = 0.004  # muon kind: AdamW lr of lm_head (before the width scaling)
    matrix_lr: float = 0.02  # muon kind: Muon lr of the block matrices
    lr: float = 1e-3  # adamw kind: the one lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.8, 0.95)
    adam_eps: float = 1e-10
    muon_momentum: float = 0.95  # momentum after warmup
    muon_momentum_start: float = 0.85  # momentum at step 0
    muon_momentum_warmup_steps: int = 300  # steps to go linearly from start to muon_momentum
    ns_steps: int = 5  # Newton–Schulz iterations
    scale_lr_by_width: bool = True  # muon kind: AdamW lrs × (n_embd / 768) ** -0.5

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZER_KINDS:
            raise ConfigError(f"OptimConfig.kind must be one of {OPTIMIZER_KINDS}, got {self.kind!r}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "lr", "weight_decay", "adam_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"OptimConfig.{name} must be a finite number >= 0, got {value!r}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"OptimConfig.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        for name in ("muon_momentum", "muon_momentum_start"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("muon_momentum_warmup_steps", "ns_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"OptimConfig.{name} must be an integer >= 0, got {value!r}")


def zeropower_via_newtonschulz5(G: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalise G (..., rows, cols): singular values land near 1, roughly in [0.5, 1.5].

    Works on a batch of same-shape matrices at once. Runs in bf16 on CUDA (stable there and fast) and fp32
    elsewhere (CPUs have no fast bf16 matmul). Each iteration is X ← aX + (bA + cA²)X with A = XXᵀ, written
    as fused multiply-adds (baddbmm) so no extra elementwise passes over the matrices are needed.
    """
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    squeeze = X.ndim == 2
    if squeeze:
        X = X.unsqueeze(0)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if transposed:
        X = X.mT
    if squeeze:
        X = X.squeeze(0)
    return X.to(G.dtype)


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    frac = 1.0 if warmup_steps == 0 else min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D parameters only (https://kellerjordan.github.io/posts/muon/)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5) -> None:
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ConfigError("Muon optimises 2-D parameters only")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            momentum = group["momentum"]
            by_shape: dict[tuple[int, ...], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for (rows, cols), params in by_shape.items():  # one batched Newton–Schulz per shape
                updates = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf: Tensor = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1.0 - momentum)
                    updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
                orthogonal = zeropower_via_newtonschulz5(torch.stack(updates), group["ns_steps"])
                scale = -group["lr"] * max(1.0, rows / cols) ** 0.5
                torch._foreach_add_(params, list(orthogonal.unbind(0)), alpha=scale)


def build_optimizers(model: GPT, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """The inner optimisers for ``model``: [AdamW, Muon] for kind "muon", [AdamW] for kind "adamw"."""
    adamw_kwargs: dict[str, Any] = dict(betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if model.lm_head.weight.is_cuda:
        adamw_kwargs["fused"] = True
    if cfg.kind == "adamw":
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW([dict(params=list(model.parameters()), lr=cfg.lr)], **adamw_kwargs)
        ]
    else:
        groups = model.param_groups()
        scale = (model.config.n_embd / 768) ** -0.5 if cfg.scale_lr_by_width else 1.0
        adamw = torch.optim.AdamW([
            dict(params=groups.unembedding, lr=cfg.unembedding_lr * scale),
            dict(params=groups.embedding, lr=cfg.embedding_lr * scale),
        ], **adamw_kwargs)
        muon = Muon(groups.matrix, lr=cfg.matrix_lr, momentum=cfg.muon_momentum_start, ns_steps=cfg.ns_steps)
        for group in muon.param_groups:
            group.update(momentum_start=cfg.muon_momentum_start, momentum_end=cfg.muon_momentum,
                         momentum_warmup_steps=cfg.muon_momentum_warmup_steps)
        optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


@dataclass(frozen=True)
class LRSchedule:
    total_steps: int  # steps of the whole plan
    warmup_steps: int = 0  # linear ramp from 1/warmup_steps to 1
    warmdown_ratio: float = 0.2  # last fraction of total_steps decays linearly to final_lr_frac
    final_lr_frac: float = 0.0  # multiplier at and after total_steps

    def __post_init__(self) -> None:
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ConfigError(f"LRSchedule.total_steps must be a positive integer, got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(f"LRSchedule.warmup_steps must be in [0, total_steps], got {self.warmup_steps!r}")
        if not 0.0 <= self.warmdown_ratio <= 1.0:
            raise ConfigError(f"LRSchedule.warmdown_ratio must be in [0, 1], got {self.warmdown_ratio!r}")
        if not 0.0 <= self.final_lr_frac <= 1.0:
            raise ConfigError(f"LRSchedule.final_lr_frac must be in [0, 1], got {self.final_lr_frac!r}")

    @property
    def warmdown_steps(self) -> int:
        return round(self.warmdown_ratio * self.total_steps)

    def multiplier(self, step: int) -> float:
        """The lr multiplier at ``step`` (0-based): min(warmup ramp, warmdown ramp), in [0, 1]."""
        if step < 0:
            raise ConfigError(f"LRSchedule step must be >= 0, got {step}")
        warm = 1.0 if step >= self.warmup_steps else (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            decay = self.final_lr_frac
        elif step < self.total_steps - self.warmdown_steps:
            decay = 1.0
        else:
            progress = (self.total_steps - step) / self.warmdown_steps  # 1 → 1/warmdown_steps
            decay = self.final_lr_frac + (1.0 - self.final_lr_frac) * progress
        return min(warm, max(decay, self.final_lr_frac))


def apply_lr(optimizers: Sequence[torch.optim.Optimizer], multiplier: float, step: int) -> None:
    """Set each group's lr to ``initial_lr × multiplier`` and Muon's momentum for ``step``."""
    if not (math.isfinite(multiplier) and multiplier >= 0):
        raise ConfigError(f"lr multiplier must be a finite number >= 0, got {multiplier}")
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if "momentum_warmup_steps" in group:
                group["momentum"] = muon_momentum_at(step, group["momentum_start"], group["momentum_end"],
                                                     group["momentum_warmup_steps"])


def optimizer_state_tensors(optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Tensor]:
    """Every optimiser's per-parameter state as ``opt<i>.state.<param_idx>.<key>`` → tensor (CPU, contiguous).

    ``param_idx`` counts the optimiser's parameters across its groups in order (as ``state_dict()`` does);
    scalar entries (e.g. AdamW's ``step``) become 0-d tensors. Hyper-parameters are not included: they come
    from the config and ``apply_lr``.
    """
    out: dict[str, Tensor] = {}
    for i, opt in enumerate(optimizers):
        for idx, entries in opt.state_dict()["state"].items():
            for key, value in entries.items():
                tensor = value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)
                out[f"opt{i}.state.{idx}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def load_optimizer_state_tensors(optimizers: Sequence[torch.optim.Optimizer], tensors: dict[str, Tensor]) -> None:
    """Restore what ``optimizer_state_tensors`` saved into freshly built optimisers of the same model/config.

    Raises ``CheckpointError`` naming the first key that does not fit (unknown optimiser or parameter index,
    malformed name, or a tensor whose shape differs from its parameter's).
    """
    per_opt: list[dict[int, dict[str, Tensor]]] = [{} for _ in optimizers]
    for name, tensor in tensors.items():
        parts = name.split(".", 3)
        if (len(parts) != 4 or not parts[0].startswith("opt") or not parts[0][3:].isdigit()
                or parts[1] != "state" or not parts[2].isdigit()):
            raise CheckpointError(f"optimizer state key {name!r} is not of the form opt<i>.state.<idx>.<key>")
        opt_i, idx, key = int(parts[0][3:]), int(parts[2]), parts[3]
        if opt_i >= len(optimizers):
            raise CheckpointError(f"optimizer state key {name!r}: only {len(optimizers)} optimizers here")
        params = [p for group in optimizers[opt_i].param_groups for p in group["params"]]
        if idx >= len(params):
            raise CheckpointError(f"optimizer state key {name!r}: optimizer {opt_i} has {len(params)} params")
        if tensor.ndim > 0 and tuple(tensor.shape) != tuple(params[idx].shape):
            raise CheckpointError(f"optimizer state key {name!r}: shape {tuple(tensor.shape)} != parameter "
                                  f"shape {tuple(params[idx].shape)}")
        per_opt[opt_i].setdefault(idx, {})[key] = tensor
    for opt, state in zip(optimizers, per_opt):
        sd = opt.state_dict()
        sd["state"] = state
        opt.load_state_dict(sd)
