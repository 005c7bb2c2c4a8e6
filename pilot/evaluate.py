"""Bits per byte (BPB): a tokenizer-independent score of a language model.

    BPB = sum of nats over target tokens / (ln 2 * sum of UTF-8 bytes of those tokens)

The byte length of every token id comes from ``token_bytes`` (a 1-D integer
tensor over the vocabulary). As in nanochat, targets whose byte length is 0
(special tokens such as <|bos|>) are left out of both sums, and targets equal
to -1 (padding / ignore index) are left out too. Because the denominator is
bytes of text, not tokens, models with different tokenizers compare fairly.

``evaluate_bpb`` runs the model in eval mode under ``torch.no_grad`` (restoring
train mode afterwards), optionally under autocast, and all-reduces the sums
when ``torch.distributed`` is initialised, so every rank returns the global
result. The model is called as ``model(inputs, targets, loss_reduction="none")``
and must return per-token losses in nats, shaped (B*T,) or (B, T).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pilot.errors import DataError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -1


@dataclass(frozen=True)
class BPBResult:
    """The outcome of one evaluation pass (summed over all ranks)."""

    bpb: float  # bits per byte of target text
    nats: float  # total cross-entropy of the counted targets, in nats
    bytes: int  # total UTF-8 bytes of the counted targets
    tokens: int  # number of counted targets (special and ignored ones excluded)
    loss_per_token: float  # nats / tokens: the mean loss over counted targets

    def as_dict(self) -> dict[str, float | int]:
        return {
            "bpb": self.bpb,
            "nats": self.nats,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "loss_per_token": self.loss_per_token,
        }


def evaluate_bpb(
    model: Any,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    *,
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
) -> BPBResult:
    """Score ``model`` in bits per byte over ``batches`` of (inputs, targets).

    ``max_batches`` stops after that many batches (every rank must use the same
    value under torch.distributed). Raises ``DataError`` when no target carries
    any bytes, or when a target id lies outside ``token_bytes``.
    """
    import torch

    device = torch.device(device)
    byte_table = _check_token_bytes(token_bytes).to(device)
    # float64 keeps sums of millions of per-token losses exact enough; MPS has no float64.
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(3, dtype=acc_dtype, device=device)  # nats, bytes, tokens
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            for index, (inputs, targets) in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with autocast:
                    losses = model(inputs, targets, loss_reduction="none")
                sums += _batch_sums(losses, targets, byte_table, acc_dtype)
    finally:
        model.train(was_training)
    _all_reduce(sums)
    return _result(sums)


def bpb_from_losses(losses: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> BPBResult:
    """BPB of precomputed per-token losses (no model call, no distributed reduce)."""
    import torch

    byte_table = _check_token_bytes(token_bytes).to(losses.device)
    return _result(_batch_sums(losses, targets.to(losses.device), byte_table, torch.float64))


def _result(sums: torch.Tensor) -> BPBResult:
    """Turn summed [nats, bytes, tokens] into a BPBResult."""
    nats, total_bytes, tokens = (float(v) for v in sums.cpu())
    if total_bytes <= 0:
        raise DataError("no target bytes to evaluate: the batches were empty or held only special/ignored tokens")
    return BPBResult(
        bpb=nats / (math.log(2) * total_bytes),
        nats=nats,
        bytes=int(round(total_bytes)),
        tokens=int(round(tokens)),
        loss_per_token=nats / tokens,
    )


def _batch_sums(
    losses: torch.Tensor, targets: torch.Tensor, byte_table: torch.Tensor, acc_dtype: torch.dtype
) -> torch.Tensor:
    """[nats, bytes, tokens] of one batch, counting only targets with bytes > 0."""
    import torch

    flat_targets = targets.reshape(-1)
    flat_losses = losses.reshape(-1).to(acc_dtype)
    if flat_losses.numel() != flat_targets.numel():
        raise DataError(
            f"model returned {flat_losses.numel()} per-token losses for {flat_targets.numel()} targets; "
            "it must be called with loss_reduction='none'"
        )
    valid = flat_targets != IGNORE_INDEX
    if valid.any():
        low, high = int(flat_targets[valid].min()), int(flat_targets[valid].max())
        if low < 0 or high >= byte_table.numel():
            raise DataError(f"target id out of range [0, {byte_table.numel()}): saw {low}..{high}")
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    token_len = torch.where(valid, byte_table[safe_targets], torch.zeros_like(safe_targets))
    counted = token_len > 0
    nats = torch.where(counted, flat_losses, torch.zeros_like(flat_losses)).sum()
    return torch.stack([nats, token_len.sum().to(acc_dtype), counted.sum().to(acc_dtype)])


def _check_token_bytes(token_bytes: torch.Tensor) -> torch.Tensor:
    import torch

    if not isinstance(token_bytes, torch.Tensor) or token_bytes.dim() != 1:
        raise DataError("token_bytes must be a 1-D tensor with one byte length per token id")
    if token_bytes.dtype.is_floating_point or token_bytes.dtype == torch.bool:
        raise DataError(f"token_bytes must hold integers, got {token_bytes.dtype}")
    if token_bytes.numel() and int(token_bytes.min()) < 0:
        raise DataError("token_bytes holds a negative byte length")
    return token_bytes.to(torch.int64)


def _all_reduce(sums: torch.Tensor) -> None:
    """Sum ``sums`` across ranks in place when a process group is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
