"""The pure logic of a federated round: no Flower messaging, no Redis (the services call these).

Trainer side::

    delta = pseudo_gradient(global_state, model.state_dict())          # Δ = W_r − W_local, fp32
    residual = load_residual(work_dir / "residual.safetensors", shapes)  # error feedback (None at first)
    encoded, residual = codec.encode(delta, residual)                   # UpdateCodec(kind, block_size)
    save_residual(work_dir / "residual.safetensors", residual)
    arrays, meta = to_records(encoded)                                  # ArrayRecord + ConfigRecord

Coordinator side, per reply, then once per round::

    encoded = from_records(arrays, meta)                                # BadUpdate if malformed
    delta = codec.decode(encoded)
    stats = validate_update(delta, shapes, limits, weights_norm=norm)   # BadUpdate names tensor + reason
    tokens = validate_metrics(metrics)
    accumulator.add(delta, tokens)                                      # DeltaAccumulator (float64 sums)
    ...
    mean = accumulator.mean()                                           # None: no valid reply, keep W_r
    if mean is not None:
        new_state = outer.step(global_state, mean)                      # OuterOptimizer(OuterConfig(kind))
    checkpoint groups: {"model": new_state, "outer_momentum": outer.state_tensors()}

Modules: ``delta`` (pseudo-gradient, norms), ``codec`` (fp32/bf16/int8 + error feedback), ``residual`` (the
trainer's residual on disk), ``wire`` (Flower records), ``validate``, ``aggregate``, ``outer``.
"""

from __future__ import annotations

from pilot.federated.aggregate import DeltaAccumulator, weighted_mean
from pilot.federated.codec import (
    ENCODINGS,
    SCALE_SUFFIX,
    EncodedUpdate,
    UpdateCodec,
    dequantize_int8,
    quantize_int8,
)
from pilot.federated.delta import global_norm, numel, pseudo_gradient
from pilot.federated.outer import OUTER_KINDS, OuterConfig, OuterOptimizer
from pilot.federated.residual import load_residual, save_residual
from pilot.federated.validate import TOKENS_METRIC, UpdateLimits, UpdateStats, validate_metrics, validate_update
from pilot.federated.wire import from_records, serialized_nbytes, to_records

__all__ = [
    "ENCODINGS",
    "OUTER_KINDS",
    "SCALE_SUFFIX",
    "TOKENS_METRIC",
    "DeltaAccumulator",
    "EncodedUpdate",
    "OuterConfig",
    "OuterOptimizer",
    "UpdateCodec",
    "UpdateLimits",
    "UpdateStats",
    "dequantize_int8",
    "from_records",
    "global_norm",
    "load_residual",
    "numel",
    "pseudo_gradient",
    "quantize_int8",
    "save_residual",
    "serialized_nbytes",
    "to_records",
    "validate_metrics",
    "validate_update",
    "weighted_mean",
]
