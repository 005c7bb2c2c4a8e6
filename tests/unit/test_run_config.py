"""The federated run's config: Pilot keys, the seed's keys, and refusals naming the key."""

from __future__ import annotations

import pytest

from pilot.errors import ConfigError
from pilot.run_config import run_config_from


def test_defaults_follow_the_outer_optimiser():
    fedavg = run_config_from({"data": "x"})
    diloco = run_config_from({"data": "x", "outer": "diloco"})
    assert (fedavg.outer_lr_value, fedavg.outer_momentum_value) == (1.0, 0.0)
    assert (diloco.outer_lr_value, diloco.outer_momentum_value) == (0.7, 0.9)
    assert run_config_from({"data": "x", "outer": "diloco", "outer-lr": 0.5}).outer_lr_value == 0.5


def test_seed_and_flower_keys_are_translated():
    config = run_config_from({
        "data": "x", "num_rounds": 4, "model_type": "nanochat_d20", "max_length": 128,
        "gradient_accumulation_steps": 2, "lr": 3e-4, "task_type": "pretrain", "num_shards": 2,
        "batch_size": 16, "weight_decay": 0.1, "redis_url": "redis://h:1/0",
    })
    assert (config.rounds, config.preset, config.seq_len, config.grad_accum) == (4, "d20", 128, 2)
    assert config.adamw_lr == 3e-4 and config.batch_size == 16 and config.weight_decay == 0.1
    assert config.redis_url == "redis://h:1/0"
    flower = run_config_from({"data": "x", "num-server-rounds": 5, "max-steps": 50})
    assert (flower.rounds, flower.round_steps) == (5, 50)


def test_later_layers_win():
    config = run_config_from({"data": "x", "rounds": 2}, {"rounds": 7})
    assert config.rounds == 7


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"data": "x", "round-secs": 3}, "'round-secs'"),
        ({"data": "x", "outer": "adam"}, "'fedavg', 'diloco'"),
        ({"data": "x", "update-dtype": "fp8"}, "'update-dtype'"),
        ({"data": "x", "run-id": "bad id!"}, "run-id"),
        ({"data": "x", "num_shards": "two"}, "'num_shards'"),
        ({"data": "x", "round-seconds": -1}, "'round-seconds'"),
    ],
)
def test_bad_keys_and_values_are_named(values, needle):
    with pytest.raises(ConfigError) as info:
        run_config_from(values)
    assert needle in str(info.value)
