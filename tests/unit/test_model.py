"""Unit tests for pilot.model: sizes, presets, causality, GQA, soft-cap, loss, init and generation."""

from __future__ import annotations

import math

import pytest
import torch

from pilot.errors import ConfigError
from pilot.model import (
    GPT,
    GPTConfig,
    apply_rotary,
    build_model,
    count_parameters,
    meta_model,
    parameter_shapes,
    preset_config,
    rotary_tables,
)

TINY = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)


def randomised(cfg: GPTConfig, seed: int = 0, std: float = 0.3) -> GPT:
    """A model whose every weight is random (the real init zeroes lm_head, which would hide bugs)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@pytest.mark.parametrize(("preset", "expected"), [("d20", 560_988_160), ("d32", 1_879_048_192)])
def test_nanochat_parameter_counts(preset: str, expected: int) -> None:
    assert count_parameters(preset_config(preset, vocab_size=65536)) == expected


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 6, 12])
def test_parameter_count_is_embeddings_plus_12_d_squared_per_layer(depth: int) -> None:
    cfg = preset_config(f"d{depth}", vocab_size=1000)
    d = 64 * depth
    assert count_parameters(cfg) == 2 * 1000 * d + 12 * d * d * depth


def test_parameter_shapes_are_on_meta_and_named_like_the_state_dict() -> None:
    cfg = preset_config("d20", vocab_size=65536)
    shapes = parameter_shapes(cfg)
    assert shapes["transformer.wte.weight"] == (65536, 1280)
    assert shapes["lm_head.weight"] == (65536, 1280)
    assert shapes["transformer.h.19.mlp.c_fc.weight"] == (5120, 1280)
    assert all(p.is_meta for p in meta_model(cfg).parameters())
    assert len(shapes) == 2 + 6 * 20
    tiny = build_model(TINY)
    assert parameter_shapes(TINY) == {name: tuple(t.shape) for name, t in tiny.state_dict().items()}


def test_state_dict_holds_only_parameters_and_a_meta_build_loads_it_exactly() -> None:
    model = randomised(TINY).eval()
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    loaded = meta_model(TINY).to_empty(device="cpu")  # the checkpoint-loading path: no init_weights
    loaded.load_state_dict(model.state_dict())
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_len))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx), model(idx), rtol=0, atol=0)


@pytest.mark.parametrize(("preset", "dim", "heads", "layers"), [
    ("d1", 64, 1, 1), ("d2", 128, 1, 2), ("d3", 192, 2, 3), ("d5", 320, 4, 5), ("d6", 384, 3, 6),
    ("d20", 1280, 10, 20), ("d32", 2048, 16, 32),
])
def test_depth_presets(preset: str, dim: int, heads: int, layers: int) -> None:
    cfg = preset_config(preset, vocab_size=512)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer) == (dim, heads, heads, layers)
    assert cfg.head_dim % 2 == 0


def test_shakespeare_char_preset_and_sequence_len_override() -> None:
    cfg = preset_config("shakespeare-char", vocab_size=65)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.sequence_len, cfg.dropout) == (6, 6, 384, 256, 0.2)
    assert preset_config("d4", vocab_size=65, sequence_len=128).sequence_len == 128


@pytest.mark.parametrize("name", ["d0", "big", "d", "d-3", "dx2", ""])
def test_unknown_preset_raises_naming_it_and_the_valid_forms(name: str) -> None:
    with pytest.raises(ConfigError, match="d<N>") as err:
        preset_config(name, vocab_size=64)
    assert repr(name) in str(err.value) and "shakespeare-char" in str(err.value)


@pytest.mark.parametrize(("field", "value"), [
    ("sequence_len", 0), ("vocab_size", -1), ("n_layer", 0), ("n_head", 3), ("n_kv_head", 3),
    ("n_embd", 30), ("dropout", 1.0), ("softcap", -1.0), ("n_layer", 2.5),
])
def test_bad_config_field_raises_config_error_naming_it(field: str, value: object) -> None:
    fields = TINY.to_dict() | {field: value}
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**fields)


def test_rotary_rotates_half_split_pairs_and_scores_depend_only_on_relative_position() -> None:
    T, D = 12, 8
    cos, sin = rotary_tables(T, D)
    q = torch.randn(1, 1, 1, D).expand(1, T, 1, D)  # the same query/key vector at every position
    k = torch.randn(1, 1, 1, D).expand(1, T, 1, D)
    rq, rk = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    theta = 3 * 10000.0 ** (-torch.arange(0, D, 2) / D)  # angles at position 3
    x1, x2 = q[0, 3, 0, : D // 2], q[0, 3, 0, D // 2:]
    expected = torch.cat([x1 * theta.cos() + x2 * theta.sin(), x2 * theta.cos() - x1 * theta.sin()])
    torch.testing.assert_close(rq[0, 3, 0], expected)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    scores = rq[0, :, 0] @ rk[0, :, 0].T
    torch.testing.assert_close(scores[5, 2], scores[9, 6])  # same offset 3, same score
    assert not torch.allclose(scores[5, 2], scores[5, 4])


def test_changing_a_future_token_never_changes_earlier_logits() -> None:
    model = randomised(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_len), generator=torch.Generator().manual_seed(1))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gqa_has_fewer_parameters_and_matches_mha_with_repeated_kv_heads() -> None:
    gqa_cfg = GPTConfig(**(TINY.to_dict() | {"n_kv_head": 2}))
    removed = 2 * TINY.n_layer * TINY.n_embd * (TINY.n_head - 2) * TINY.head_dim
    assert count_parameters(gqa_cfg) == count_parameters(TINY) - removed
    gqa = randomised(gqa_cfg).eval()
    mha = build_model(TINY).eval()
    rep, hd = TINY.n_head // 2, TINY.head_dim
    state = {}
    for name, p in gqa.state_dict().items():
        if name.endswith(("c_k.weight", "c_v.weight")):  # kv head j serves query heads j*rep .. j*rep+rep-1
            p = p.view(2, hd, -1).repeat_interleave(rep, dim=0).reshape(TINY.n_head * hd, -1)
        state[name] = p
    mha.load_state_dict(state)
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_len))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx))


def test_softcap_bounds_logits_and_zero_disables_it() -> None:
    capped = randomised(TINY, std=3.0).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_len))
    with torch.no_grad():
        logits = capped(idx)
        assert logits.abs().max() <= 15.0
        assert logits.abs().max() > 14.0  # large weights push the logits against the cap
        uncapped = GPT(GPTConfig(**(TINY.to_dict() | {"softcap": 0.0})))
        uncapped.load_state_dict(capped.state_dict())
        assert uncapped.eval()(idx).abs().max() > 15.0


def test_loss_reductions_and_ignore_index() -> None:
    model = randomised(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.sequence_len))
    targets = torch.randint(0, TINY.vocab_size, (3, TINY.sequence_len))
    targets[0, :5] = -1
    with torch.no_grad():
        per_token = model(idx, targets, loss_reduction="none")
        mean, total = model(idx, targets), model(idx, targets, loss_reduction="sum")
    assert per_token.shape == (3, TINY.sequence_len)
    assert torch.all(per_token[0, :5] == 0) and torch.all(per_token[0, 5:] > 0)
    kept = targets != -1
    torch.testing.assert_close(mean, per_token[kept].mean())
    torch.testing.assert_close(total, per_token.sum())
    with pytest.raises(ConfigError, match="loss_reduction"):
        model(idx, targets, loss_reduction="max")


def test_input_longer_than_sequence_len_is_refused() -> None:
    with pytest.raises(ConfigError, match="sequence_len"):
        build_model(TINY)(torch.zeros(1, TINY.sequence_len + 1, dtype=torch.long))


def test_init_is_deterministic_and_starts_at_uniform_loss() -> None:
    torch.manual_seed(123)
    a = build_model(TINY)
    torch.manual_seed(123)
    b = build_model(TINY)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.count_nonzero(a.lm_head.weight) == 0
    assert torch.count_nonzero(a.transformer.h[0].mlp.c_fc.weight) > 0
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_len))
    loss = a(idx, idx)
    assert loss.item() == pytest.approx(math.log(TINY.vocab_size), rel=1e-6)


def test_param_groups_partition_the_parameters() -> None:
    model = build_model(TINY)
    groups = model.param_groups()
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups.matrix) and len(groups.matrix) == 6 * TINY.n_layer
    assert groups.embedding[0] is model.transformer.wte.weight
    assert groups.unembedding[0] is model.lm_head.weight


def test_flops_per_token_follows_nanochat_formula() -> None:
    cfg = preset_config("d20", vocab_size=65536)
    model = meta_model(cfg)
    non_embedding = 560_988_160 - 65536 * 1280
    assert model.estimate_flops_per_token() == 6 * non_embedding + 12 * 20 * 10 * 128 * 2048


def test_generate_is_seeded_crops_context_and_greedy_matches_argmax() -> None:
    model = randomised(GPTConfig(**(TINY.to_dict() | {"dropout": 0.5})))
    model.train()
    prompt = list(range(40))  # longer than sequence_len: must be cropped, not crash
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, seed=7)
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, seed=7)
    assert a == b and len(a) == 8 and all(0 <= t < TINY.vocab_size for t in a)
    assert model.training  # mode restored
    greedy = model.generate(prompt, 1, temperature=0.0)
    model.eval()
    with torch.no_grad():
        expected = int(model(torch.tensor([prompt[-TINY.sequence_len:]]))[0, -1].argmax())
    assert greedy == [expected]


def test_top_k_one_is_greedy() -> None:
    model = randomised(TINY)
    assert model.generate([1, 2, 3], 6, top_k=1, seed=1) == model.generate([1, 2, 3], 6, temperature=0.0)
