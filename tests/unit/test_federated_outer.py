"""Token-weighted aggregation and the outer optimiser against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.sgd import sgd

from pilot.errors import BadUpdate, CheckpointError, ConfigError
from pilot.federated import DeltaAccumulator, OuterConfig, OuterOptimizer, weighted_mean


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# three trainers with 100, 300 and 600 tokens
REPLIES = [
    ({"x": vec(1.0, 2.0), "y": vec(10.0)}, 100),
    ({"x": vec(-1.0, 0.0), "y": vec(0.0)}, 300),
    ({"x": vec(0.5, 4.0), "y": vec(-5.0)}, 600),
]
# x: (100·1 − 300·1 + 600·0.5)/1000 = 0.1, (200 + 0 + 2400)/1000 = 2.6;  y: (1000 − 3000)/1000 = −2
MEAN_1 = {"x": vec(0.1, 2.6), "y": vec(-2.0)}
MEAN_2 = {"x": vec(0.5, -1.0), "y": vec(1.0)}
W0 = {"x": vec(1.0, -2.0), "y": vec(3.0)}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert float((got[name] - want[name]).abs().max()) <= 1e-6, (name, got[name], want[name])


def test_token_weighted_mean_hand_computed() -> None:
    mean = weighted_mean(REPLIES)
    assert mean is not None
    assert_close(mean, MEAN_1)
    assert mean["x"].dtype == torch.float32
    # an unweighted mean would give x[0] = 0.1667: the weights matter
    accumulator = DeltaAccumulator()
    for delta, tokens in reversed(REPLIES):
        accumulator.add(delta, tokens)
    assert (accumulator.count, accumulator.total_tokens) == (3, 1000)
    reversed_mean = accumulator.mean()
    assert reversed_mean is not None and all(torch.equal(reversed_mean[n], mean[n]) for n in mean)


def test_zero_valid_replies_keep_the_old_weights() -> None:
    assert weighted_mean([]) is None
    assert DeltaAccumulator().mean() is None


def test_accumulator_rejects_bad_weights_and_mismatched_tensors() -> None:
    accumulator = DeltaAccumulator()
    with pytest.raises(BadUpdate, match="positive integer, got 0"):
        accumulator.add(REPLIES[0][0], 0)
    accumulator.add(*REPLIES[0])
    with pytest.raises(BadUpdate, match="tensor 'y' is missing"):
        accumulator.add({"x": vec(1.0, 1.0)}, 5)
    with pytest.raises(BadUpdate, match=r"'y' has shape \(2,\)"):
        accumulator.add({"x": vec(1.0, 1.0), "y": vec(1.0, 2.0)}, 5)
    assert accumulator.count == 1  # the rejected replies did not count


def test_fedavg_two_steps_hand_computed() -> None:
    outer = OuterOptimizer(OuterConfig("fedavg"))
    w1 = outer.step(W0, MEAN_1)
    assert_close(w1, {"x": vec(0.9, -4.6), "y": vec(5.0)})  # W − Δ̄
    w2 = outer.step(w1, MEAN_2)
    assert_close(w2, {"x": vec(0.4, -3.6), "y": vec(4.0)})
    assert outer.state_tensors() == {}
    assert W0["x"].tolist() == [1.0, -2.0]  # inputs untouched


def test_diloco_two_steps_hand_computed_with_momentum_buffer() -> None:
    config = OuterConfig("diloco")
    assert (config.lr, config.momentum, config.nesterov) == (0.7, 0.9, True)
    outer = OuterOptimizer(config)
    # step 1: buf = Δ̄ = (0.1, 2.6 | −2); d = Δ̄ + 0.9·buf = (0.19, 4.94 | −3.8); W = W0 − 0.7·d
    w1 = outer.step(W0, MEAN_1)
    assert_close(outer.state_tensors(), MEAN_1)
    assert_close(w1, {"x": vec(0.867, -5.458), "y": vec(5.66)})
    # step 2: buf = 0.9·buf + Δ̄ = (0.59, 1.34 | −0.8); d = (1.031, 0.206 | 0.28); W = W1 − 0.7·d
    w2 = outer.step(w1, MEAN_2)
    assert_close(outer.state_tensors(), {"x": vec(0.59, 1.34), "y": vec(-0.8)})
    assert_close(w2, {"x": vec(0.1453, -5.6022), "y": vec(5.464)})


@pytest.mark.parametrize("kind", ["fedavg", "diloco"])
def test_matches_torch_sgd_bit_for_bit(kind: str) -> None:
    # torch.optim.sgd.sgd is the functional kernel torch.optim.SGD.step runs (the class's first step would
    # import torch._dynamo: ~10 s here)
    config = OuterConfig(kind)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    param = torch.randn(50, 7, generator=gen)
    buffers: list[torch.Tensor | None] = [None]
    outer = OuterOptimizer(config)
    state = {"w": param.clone()}
    for _ in range(3):
        grad = torch.randn(50, 7, generator=gen)
        sgd([param], [grad.clone()], buffers, weight_decay=0.0, momentum=float(config.momentum or 0.0),
            lr=float(config.lr or 0.0), dampening=0.0, nesterov=bool(config.nesterov), maximize=False,
            foreach=False)
        state = outer.step(state, {"w": grad})
        assert torch.equal(state["w"], param)
    if kind == "diloco":
        assert buffers[0] is not None and torch.equal(outer.state_tensors()["w"], buffers[0])


def test_momentum_save_load_gives_an_identical_next_step(tmp_path: Path) -> None:
    first = OuterOptimizer(OuterConfig("diloco"))
    w1 = first.step(W0, MEAN_1)
    path = tmp_path / "outer_momentum.safetensors"
    save_file(first.state_tensors(), str(path))
    resumed = OuterOptimizer(OuterConfig("diloco"))
    resumed.load_state_tensors(load_file(str(path)), expected_shapes={"x": (2,), "y": (1,)})
    a, b = first.step(w1, MEAN_2), resumed.step(w1, MEAN_2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(first.state_tensors()[n], resumed.state_tensors()[n]) for n in a)
    # a fresh optimiser (momentum lost) would step differently
    assert not torch.equal(OuterOptimizer(OuterConfig("diloco")).step(w1, MEAN_2)["x"], a["x"])


def test_load_state_rejects_momentum_of_another_model() -> None:
    outer = OuterOptimizer(OuterConfig("diloco"))
    with pytest.raises(CheckpointError, match=r"'x' has shape \(3,\)"):
        outer.load_state_tensors({"x": torch.zeros(3), "y": torch.zeros(1)}, {"x": (2,), "y": (1,)})
    with pytest.raises(CheckpointError, match="'y' is missing"):
        outer.load_state_tensors({"x": torch.zeros(2)}, {"x": (2,), "y": (1,)})
    with pytest.raises(CheckpointError, match="has no momentum"):
        OuterOptimizer(OuterConfig("fedavg")).load_state_tensors({"x": torch.zeros(2)})


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"kind": "adam"}, "kind"),
    ({"kind": "diloco", "lr": 0.0}, "lr"),
    ({"kind": "diloco", "momentum": 1.0}, "momentum"),
    ({"kind": "fedavg", "momentum": 0.9}, "momentum"),
    ({"kind": "diloco", "momentum": 0.0}, "nesterov"),
    ({"kind": "diloco", "nesterov": "yes"}, "nesterov"),
])
def test_outer_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"OuterConfig.{field}"):
        OuterConfig(**kwargs)  # type: ignore[arg-type]


def test_outer_overrides() -> None:
    config = OuterConfig("diloco", lr=0.5, momentum=0.8, nesterov=False)
    assert (config.lr, config.momentum, config.nesterov) == (0.5, 0.8, False)
    assert OuterConfig("fedavg", lr=0.5).lr == 0.5  # server learning rate
