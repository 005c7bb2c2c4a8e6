"""validate_update / validate_metrics: every rejection names the tensor or metric and the reason."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from pilot.errors import BadUpdate, ConfigError
from pilot.federated import UpdateLimits, validate_metrics, validate_update

SHAPES = {"a": (1, 2), "b": (2,)}


def good() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([[3.0, 0.0]]), "b": torch.tensor([0.0, 4.0])}  # ‖Δ‖ = 5


def test_accepts_a_good_update_and_reports_hand_computed_stats() -> None:
    stats = validate_update(good(), SHAPES, UpdateLimits(max_norm=5.0, max_rel_norm=0.5), weights_norm=10.0)
    assert stats.norm == pytest.approx(5.0)
    assert stats.numel == 4
    assert stats.rel_norm == pytest.approx(0.5)


@pytest.mark.parametrize(("change", "reason"), [
    ({"b": torch.tensor([float("nan"), 1.0])}, r"tensor 'b' has non-finite values \(1 NaN, 0 Inf\)"),
    ({"a": torch.tensor([[float("inf"), float("-inf")]])}, r"tensor 'a' has non-finite values \(0 NaN, 2 Inf\)"),
    ({"a": torch.zeros(2, 1)}, r"tensor 'a' has shape \(2, 1\), expected \(1, 2\)"),
    ({"b": torch.zeros(2, dtype=torch.float64)}, "tensor 'b' has dtype torch.float64, expected torch.float32"),
    ({"c": torch.zeros(1)}, "unexpected tensor 'c'"),
    ({"a": torch.full((1, 2), 1e30)}, "update norm overflows.*'a'"),
])
def test_rejects_malformed_tensors(change: dict[str, torch.Tensor], reason: str) -> None:
    with pytest.raises(BadUpdate, match=reason):
        validate_update({**good(), **change}, SHAPES)


def test_rejects_a_missing_tensor() -> None:
    with pytest.raises(BadUpdate, match="tensor 'b' is missing"):
        validate_update({"a": good()["a"]}, SHAPES)


def test_rejects_norms_above_the_bounds_naming_the_largest_tensor() -> None:
    huge = {"a": torch.tensor([[1e3, 0.0]]), "b": torch.tensor([0.0, 1.0])}
    with pytest.raises(BadUpdate, match=r"norm 1000 exceeds max_norm 100 \(largest tensor: 'a'\)"):
        validate_update(huge, SHAPES, UpdateLimits(max_norm=100.0))
    with pytest.raises(BadUpdate, match=r"0.5 × the weights' norm, above max_rel_norm 0.4 \(largest tensor: 'b'\)"):
        validate_update(good(), SHAPES, UpdateLimits(max_rel_norm=0.4), weights_norm=10.0)
    with pytest.raises(ValueError, match="needs weights_norm"):
        validate_update(good(), SHAPES, UpdateLimits(max_rel_norm=0.4))


@pytest.mark.parametrize("field", ["max_norm", "max_rel_norm"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, True])
def test_limits_config_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"UpdateLimits.{field}"):
        UpdateLimits(**{field: value})


def test_metrics_return_tokens_and_reject_bad_values() -> None:
    assert validate_metrics({"tokens": 4096, "loss": 3.2, "steps": 8, "losses": [3.0, 2.5]}) == 4096
    assert validate_metrics({"tokens": 512.0}) == 512  # MetricRecord may carry it as a float
    for metrics, reason in [
        ({"tokens": 0}, "'tokens' must be a positive integer, got 0"),
        ({"tokens": -5}, "'tokens' must be a positive integer"),
        ({"tokens": 10.5}, "'tokens' must be a positive integer"),
        ({"loss": 1.0}, "'tokens'.*missing"),
        ({"tokens": 10, "loss": float("nan")}, "metric 'loss' is not finite"),
        ({"tokens": 10, "losses": [1.0, float("inf")]}, "metric 'losses' is not finite"),
        ({"tokens": 10, "note": "hi"}, "metric 'note' is 'hi', not a number"),
    ]:
        with pytest.raises(BadUpdate, match=reason):
            validate_metrics(metrics)
