"""UpdateCodec: int8 / bf16 error bounds, error feedback, malformed updates, residual persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pilot.errors import BadUpdate, ConfigError
from pilot.federated import (
    SCALE_SUFFIX,
    EncodedUpdate,
    UpdateCodec,
    dequantize_int8,
    load_residual,
    pseudo_gradient,
    quantize_int8,
    save_residual,
)


def varied(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Random values whose magnitude varies over 6 orders, so per-block scales really differ."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base * torch.exp(torch.empty(shape).uniform_(-7.0, 7.0, generator=gen))


def sample_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"wte.weight": varied(seed, (37, 16)), "h.0.w": varied(seed + 1, (600,)), "empty": torch.zeros(0, 4)}


def test_pseudo_gradient_is_global_minus_local_in_fp32() -> None:
    global_state = {"w": torch.tensor([1.0, 2.0, 3.0]).to(torch.bfloat16), "v": torch.tensor([[0.5]])}
    local_state = {"w": torch.tensor([0.5, 2.5, 3.0]), "v": torch.tensor([[1.0]])}
    delta = pseudo_gradient(global_state, local_state)
    assert delta["w"].dtype == torch.float32
    assert delta["w"].tolist() == [0.5, -0.5, 0.0]
    assert delta["v"].tolist() == [[-0.5]]
    with pytest.raises(ValueError, match="'v' is missing"):
        pseudo_gradient(global_state, {"w": local_state["w"]})


def test_int8_hand_computed_per_tensor_and_per_block() -> None:
    x = torch.tensor([0.5, -1.27, 0.01, 0.0])
    q, scale = quantize_int8(x, None)  # absmax 1.27 -> scale 0.01
    assert q.tolist() == [50, -127, 1, 0]
    assert scale.tolist() == pytest.approx([0.01])
    q2, scale2 = quantize_int8(x, 2)  # blocks [0.5, -1.27] and [0.01, 0.0]
    assert q2.tolist() == [50, -127, 127, 0]
    assert scale2.tolist() == pytest.approx([0.01, 0.01 / 127])
    assert dequantize_int8(q2, scale2, 2).tolist() == pytest.approx([0.5, -1.27, 0.01, 0.0])
    q3, scale3 = quantize_int8(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 2)  # last block padded
    assert scale3.tolist() == pytest.approx([2 / 127, 4 / 127, 5 / 127])
    assert q3.tolist() == [64, 127, 95, 127, 127]  # 1/(2/127) = 63.5 -> 64 (half to even)


@pytest.mark.parametrize("block_size", [None, 256, 7])
def test_int8_error_is_at_most_half_a_block_scale(block_size: int | None) -> None:
    delta = sample_delta()
    encoded, residual = UpdateCodec("int8", block_size).encode(delta)
    decoded = UpdateCodec("int8", block_size).decode(encoded)
    for name, x in delta.items():
        flat = x.reshape(-1)
        width = block_size or max(flat.numel(), 1)
        for start in range(0, flat.numel(), width):
            block = flat[start:start + width]
            scale = float(block.abs().max()) / 127  # computed independently of the codec
            err = (block - decoded[name].reshape(-1)[start:start + width]).abs()
            assert float(err.max()) <= scale / 2 * (1 + 1e-5), (name, start)
        assert residual is not None
        assert torch.equal(residual[name], x - decoded[name])
    assert encoded.arrays["h.0.w" + SCALE_SUFFIX].shape == ((1,) if block_size is None else (-(-600 // block_size),))


def test_bf16_round_trip_relative_error_bound() -> None:
    delta = sample_delta(3)
    codec = UpdateCodec("bf16")
    encoded, residual = codec.encode(delta)
    decoded = codec.decode(encoded)
    assert encoded.arrays["h.0.w"].dtype == np.int16
    for name, x in delta.items():
        assert bool(((x - decoded[name]).abs() <= x.abs() * 2.0 ** -8).all()), name
        assert torch.equal(decoded[name], x.to(torch.bfloat16).float())
    assert residual is not None and float(residual["h.0.w"].abs().max()) > 0


def test_fp32_is_exact_and_has_no_residual() -> None:
    delta = sample_delta(4)
    encoded, residual = UpdateCodec("fp32").encode(delta)
    assert residual is None
    decoded = UpdateCodec("fp32").decode(encoded)
    assert all(torch.equal(decoded[n], delta[n]) for n in delta)
    assert encoded.num_bytes == 4 * (37 * 16 + 600)


def test_error_feedback_tracks_the_true_running_sum() -> None:
    # One large element fixes the per-tensor scale (1/127); the small ones (0.003 < scale/2) would round to 0
    # every round without feedback, so their sum is lost; with feedback it arrives, late by < one step.
    gen = torch.Generator().manual_seed(5)
    codec = UpdateCodec("int8", None)
    rounds, n = 200, 64
    true_sum, sum_ef, sum_plain = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    residual = None
    for _ in range(rounds):
        step = torch.full((n,), 0.003) + 0.001 * torch.randn(n, generator=gen)
        step[0] = 1.0
        true_sum += step
        encoded, residual = codec.encode({"w": step}, residual)
        sum_ef += codec.decode(encoded)["w"]
        sum_plain += codec.decode(codec.encode({"w": step})[0])["w"]
    quant_step = 1.0 / 127  # the largest scale any round used
    assert float((true_sum - sum_ef).abs().max()) <= quant_step
    assert residual is not None and torch.allclose(true_sum - sum_ef, residual["w"], atol=1e-4)
    assert float((true_sum - sum_plain).abs().max()) > 50 * quant_step  # ≈ 0.6 drift without feedback


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_encode_refuses_non_finite_values(kind: str) -> None:
    with pytest.raises(BadUpdate, match="'b' has non-finite"):
        UpdateCodec(kind, 4).encode({"a": torch.ones(4), "b": torch.tensor([1.0, float("nan")])})  # type: ignore
    with pytest.raises(BadUpdate, match="'a' has non-finite"):
        UpdateCodec(kind, None).encode({"a": torch.tensor([float("-inf"), 0.0])})  # type: ignore


def test_encode_refuses_a_residual_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"residual 'a' has shape \(1,\), the update \(4,\)"):
        UpdateCodec("int8", 4).encode({"a": torch.ones(4)}, {"a": torch.zeros(1)})


@pytest.mark.parametrize(("kind", "block"), [("fp4", None), ("int8", 0), ("int8", True), ("bf16", 2.5)])
def test_codec_config_errors_name_the_field(kind: str, block: object) -> None:
    with pytest.raises(ConfigError, match="UpdateCodec.kind" if kind == "fp4" else "UpdateCodec.block_size"):
        UpdateCodec(kind, block)  # type: ignore[arg-type]


def test_block_size_only_applies_to_int8() -> None:
    assert UpdateCodec("bf16", 256).block_size is None
    assert UpdateCodec("int8", 256).block_size == 256


def int8_update() -> EncodedUpdate:
    return UpdateCodec("int8", 256).encode({"a": torch.ones(300), "b": torch.ones(2, 3)})[0]


def test_malformed_updates_raise_bad_update_with_reason() -> None:
    good = int8_update()
    arrays, meta = good.to_arrays(), good.metadata()
    missing = {k: v for k, v in arrays.items() if k != "b"}
    with pytest.raises(BadUpdate, match="'b' is missing"):
        EncodedUpdate.from_arrays(missing, meta)
    with pytest.raises(BadUpdate, match="unexpected tensor 'c'"):
        EncodedUpdate.from_arrays({**arrays, "c": np.zeros(1, np.int8)}, meta)
    with pytest.raises(BadUpdate, match=r"'a': scales are float32\[2\], expected float32\[1\]"):
        EncodedUpdate.from_arrays(arrays, {**meta, "block_size": 512})
    with pytest.raises(BadUpdate, match="'a': payload dtype float32 is not int8"):
        EncodedUpdate.from_arrays({**arrays, "a": arrays["a"].astype(np.float32)}, meta)
    with pytest.raises(BadUpdate, match="'b': scales must be finite"):
        EncodedUpdate.from_arrays({**arrays, "b" + SCALE_SUFFIX: np.array([np.inf], np.float32)}, meta)
    with pytest.raises(BadUpdate, match="unknown update encoding 'int4'"):
        EncodedUpdate.from_arrays(arrays, {**meta, "encoding": "int4"})
    with pytest.raises(BadUpdate, match="format_version"):
        EncodedUpdate.from_arrays(arrays, {**meta, "format_version": 99})
    with pytest.raises(BadUpdate, match="lacks names"):
        EncodedUpdate.from_arrays(arrays, {k: v for k, v in meta.items() if k != "names"})
    with pytest.raises(BadUpdate, match="block_size -1"):
        EncodedUpdate.from_arrays(arrays, {**meta, "block_size": -1})


def test_decode_refuses_an_update_of_another_encoding() -> None:
    with pytest.raises(BadUpdate, match=r"update is int8 \(block 256\), but this run expects int8 \(block 128\)"):
        UpdateCodec("int8", 128).decode(int8_update())
    with pytest.raises(BadUpdate, match="but this run expects bf16"):
        UpdateCodec("bf16").decode(int8_update())


def test_from_arrays_accepts_torch_tensors_including_bf16() -> None:
    codec = UpdateCodec("bf16")
    encoded, _ = codec.encode({"w": torch.tensor([1.5, -2.25])})
    as_torch = {"w": torch.tensor([1.5, -2.25]).to(torch.bfloat16)}
    rebuilt = EncodedUpdate.from_arrays(as_torch, encoded.metadata())
    assert codec.decode(rebuilt)["w"].tolist() == [1.5, -2.25]


def test_residual_save_load_round_trip(tmp_path: Path) -> None:
    delta = sample_delta(6)
    _, residual = UpdateCodec("int8", 64).encode(delta)
    path = tmp_path / "work" / "residual.safetensors"
    save_residual(path, residual)
    shapes = {name: tuple(t.shape) for name, t in delta.items()}
    loaded = load_residual(path, shapes)
    assert loaded is not None and residual is not None
    assert all(torch.equal(loaded[n], residual[n]) for n in delta)
    assert load_residual(path, {**shapes, "h.0.w": (601,)}) is None  # another model: start afresh
    path.write_bytes(b"not safetensors")
    assert load_residual(path, shapes) is None  # corrupt: start afresh
    save_residual(path, None)
    assert not path.exists() and load_residual(path, shapes) is None


@pytest.mark.parametrize("codec", [UpdateCodec("bf16"), UpdateCodec("int8", 8)], ids=["bf16", "int8"])
def test_encode_leaves_its_inputs_alone(codec: UpdateCodec) -> None:
    delta = sample_delta(7)
    residual = {name: torch.full_like(t, 1e-3) for name, t in delta.items()}
    before = ({n: t.clone() for n, t in delta.items()}, {n: t.clone() for n, t in residual.items()})
    for res in (None, residual):
        codec.encode(delta, res)
        assert all(torch.equal(delta[n], before[0][n]) for n in delta)
        assert all(torch.equal(residual[n], before[1][n]) for n in delta)


@pytest.mark.gpu
def test_gpu_encode_matches_cpu_bit_for_bit() -> None:
    delta = sample_delta(8)
    codec = UpdateCodec("int8", 256)
    cpu, cpu_residual = codec.encode(delta)
    gpu, gpu_residual = codec.encode({n: t.cuda() for n, t in delta.items()})
    assert cpu_residual is not None and gpu_residual is not None
    for key, array in cpu.arrays.items():
        assert np.array_equal(gpu.arrays[key], array), key
    for name in delta:
        assert gpu_residual[name].is_cuda and torch.equal(gpu_residual[name].cpu(), cpu_residual[name])
