"""Unit tests for pilot.optim: Muon, the optimiser split, the lr schedule, and optimiser state round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pilot.errors import CheckpointError, ConfigError
from pilot.model import GPT, GPTConfig, build_model
from pilot.optim import (
    LRSchedule,
    Muon,
    OptimConfig,
    apply_lr,
    build_optimizers,
    load_optimizer_state_tensors,
    optimizer_state_tensors,
    zeropower_via_newtonschulz5,
)

TINY = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, TINY.vocab_size, (4, TINY.sequence_len + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def train_step(model: GPT, optimizers: list[torch.optim.Optimizer], step: int, seed: int = 0) -> float:
    apply_lr(optimizers, 1.0, step)
    x, y = batch(seed)
    loss = model(x, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.item()


def fixed_batch_loss(model: GPT) -> float:
    with torch.no_grad():
        return model(*batch()).item()


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizers = build_optimizers(model, OptimConfig(kind=kind))
    before = fixed_batch_loss(model)
    train_step(model, optimizers, step=0)
    assert fixed_batch_loss(model) < before - 1e-3


def test_muon_alone_lowers_the_loss_and_moves_every_matrix() -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():  # non-zero head and projections so every block matrix gets a gradient
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.05)
    muon = build_optimizers(model, OptimConfig())[1]
    assert isinstance(muon, Muon)
    before = [p.detach().clone() for g in muon.param_groups for p in g["params"]]
    head_before = model.lm_head.weight.detach().clone()
    loss_before = fixed_batch_loss(model)
    train_step(model, [muon], step=0)
    assert fixed_batch_loss(model) < loss_before
    after = [p for g in muon.param_groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(model.lm_head.weight, head_before)  # Muon never touches what it does not own


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_orthogonalises(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = zeropower_via_newtonschulz5(g, steps=5)
    assert x.shape == g.shape and x.dtype == g.dtype
    singular = torch.linalg.svdvals(x)
    assert singular.min() > 0.5 and singular.max() < 1.6  # near-orthogonal (nanochat: ~U(0.5, 1.5))
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 2  # the input was not


def test_muon_refuses_non_matrices() -> None:
    with pytest.raises(ConfigError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_build_optimizers_split_and_initial_lrs() -> None:
    cfg = GPTConfig(**(TINY.to_dict() | {"n_embd": 3072, "n_head": 24, "n_kv_head": 24, "n_layer": 1}))
    with torch.device("meta"):
        model = GPT(cfg)
    adamw, muon = build_optimizers(model, OptimConfig())
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    assert [g["initial_lr"] for g in adamw.param_groups] == pytest.approx([0.004 * 0.5, 0.2 * 0.5])  # (3072/768)^-.5
    assert adamw.param_groups[0]["params"][0] is model.lm_head.weight
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    assert muon.param_groups[0]["initial_lr"] == 0.02
    owned = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))
    (plain,) = build_optimizers(model, OptimConfig(kind="adamw", lr=3e-4))
    assert isinstance(plain, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in plain.param_groups) == len(list(model.parameters()))
    assert plain.param_groups[0]["initial_lr"] == 3e-4


def test_apply_lr_scales_from_initial_lr_and_warms_up_muon_momentum() -> None:
    model = build_model(TINY)
    adamw, muon = build_optimizers(model, OptimConfig())
    for step, momentum in [(0, 0.85), (150, 0.90), (300, 0.95), (10_000, 0.95)]:
        apply_lr([adamw, muon], 0.5, step)
        assert muon.param_groups[0]["momentum"] == pytest.approx(momentum)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert adamw.param_groups[1]["lr"] == pytest.approx(adamw.param_groups[1]["initial_lr"] / 2)
    with pytest.raises(ConfigError, match="multiplier"):
        apply_lr([adamw], -0.1, 0)


def test_schedule_warmup_constant_warmdown_and_clamp_past_the_end() -> None:
    s = LRSchedule(total_steps=100, warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert s.multiplier(0) == pytest.approx(0.1)
    assert s.multiplier(4) == pytest.approx(0.5)
    assert s.multiplier(9) == s.multiplier(10) == s.multiplier(80) == 1.0
    assert s.multiplier(90) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.multiplier(99) == pytest.approx(0.1 + 0.9 * 0.05)
    assert s.multiplier(100) == s.multiplier(101) == s.multiplier(10**9) == pytest.approx(0.1)
    zero_floor = LRSchedule(total_steps=50)
    assert zero_floor.multiplier(49) > 0 and zero_floor.multiplier(50) == zero_floor.multiplier(500) == 0.0
    with pytest.raises(ConfigError, match="step"):
        s.multiplier(-1)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 500), warmup_frac=st.floats(0, 1), ratio=st.floats(0, 1), final=st.floats(0, 1),
       step=st.integers(0, 5000))
def test_schedule_multiplier_stays_in_bounds(total: int, warmup_frac: float, ratio: float, final: float,
                                             step: int) -> None:
    s = LRSchedule(total_steps=total, warmup_steps=int(warmup_frac * total), warmdown_ratio=ratio,
                   final_lr_frac=final)
    m = s.multiplier(step)
    assert 0.0 <= m <= 1.0
    if step >= s.warmup_steps:
        assert m >= final - 1e-12
    if step >= total:
        assert m == pytest.approx(final)


@pytest.mark.parametrize(("fields", "name"), [
    ({"total_steps": 0}, "total_steps"), ({"total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
    ({"total_steps": 10, "warmdown_ratio": 1.5}, "warmdown_ratio"),
    ({"total_steps": 10, "final_lr_frac": -0.1}, "final_lr_frac"),
])
def test_bad_schedule_raises_naming_the_field(fields: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        LRSchedule(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), [
    ("kind", "sgd"), ("matrix_lr", -1.0), ("embedding_lr", float("nan")), ("adam_betas", (0.9, 1.0)),
    ("muon_momentum", 1.0), ("ns_steps", -1), ("weight_decay", -0.1),
])
def test_bad_optim_config_raises_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        OptimConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_state_tensors_round_trip_through_safetensors_gives_an_identical_next_step(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizers = build_optimizers(model, OptimConfig(kind=kind))
    for step in range(3):
        train_step(model, optimizers, step, seed=step)
    state = optimizer_state_tensors(optimizers)
    assert "opt0.state.0.exp_avg" in state and state["opt0.state.0.step"].item() == 3
    if kind == "muon":
        assert any(k.startswith("opt1.") and k.endswith(".momentum_buffer") for k in state)
    weights, saved = st_save(model.state_dict()), st_save(state)  # the trainer's on-disk form; no pickle

    def resumed(load_state: bool) -> GPT:
        fresh = build_model(TINY)
        fresh.load_state_dict(st_load(weights))
        fresh_opts = build_optimizers(fresh, OptimConfig(kind=kind))
        if load_state:
            load_optimizer_state_tensors(fresh_opts, st_load(saved))
        train_step(fresh, fresh_opts, step=3, seed=3)
        return fresh

    train_step(model, optimizers, step=3, seed=3)
    for (name, p), q in zip(model.state_dict().items(), resumed(True).state_dict().values()):
        assert torch.equal(p, q), name
    without_state = resumed(False)
    assert not torch.equal(model.lm_head.weight, without_state.lm_head.weight)


def test_loading_mismatched_optimizer_state_names_the_key() -> None:
    model = build_model(TINY)
    optimizers = build_optimizers(model, OptimConfig())
    train_step(model, optimizers, step=0)
    state = optimizer_state_tensors(optimizers)
    with pytest.raises(CheckpointError, match="opt7"):
        load_optimizer_state_tensors(optimizers, {"opt7.state.0.exp_avg": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape"):
        load_optimizer_state_tensors(optimizers, state | {"opt0.state.0.exp_avg": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="bogus"):
        load_optimizer_state_tensors(optimizers, {"bogus": torch.zeros(1)})


def test_muon_under_ddp_matches_single_process(tmp_path: Path) -> None:
    """Same optimiser code path with a process group: DDP(world 1, gloo) steps exactly like plain training."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    plain = build_model(TINY)
    wrapped_inner = build_model(TINY)
    wrapped_inner.load_state_dict(plain.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DDP(wrapped_inner)
        opts_plain = build_optimizers(plain, OptimConfig())
        opts_ddp = build_optimizers(wrapped_inner, OptimConfig())
        for step in range(2):
            train_step(plain, opts_plain, step, seed=step)
            apply_lr(opts_ddp, 1.0, step)
            x, y = batch(step)
            ddp(x, y).backward()
            for opt in opts_ddp:
                opt.step()
            ddp.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(plain.state_dict().items(), wrapped_inner.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
