"""Config parsing: kebab/snake keys, env layers, and errors that name the key."""

from __future__ import annotations

import pytest

from pilot.config import build_config, parse_config
from pilot.errors import ConfigError
from pilot.train_config import TrainConfig


def test_kebab_and_snake_keys_build_the_same_config():
    a = parse_config(TrainConfig, {"data": "x.txt", "batch-size": "4", "seq-len": 64})
    b = parse_config(TrainConfig, {"data": "x.txt", "batch_size": 4, "seq_len": "64"})
    assert a == b
    assert a.batch_size == 4 and a.seq_len == 64


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        parse_config(TrainConfig, {"data": "x", "bach-size": 3}, source="pilot train")
    message = str(info.value)
    assert "pilot train" in message and "'bach-size'" in message and "'batch-size'" in message


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError) as info:
        parse_config(TrainConfig, {"data": "x", "optimizer": "sgd"})
    assert "'optimizer'" in str(info.value) and "'muon'" in str(info.value) and "'adamw'" in str(info.value)


def test_missing_and_out_of_range_values_are_named():
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        parse_config(TrainConfig, {})
    with pytest.raises(ConfigError, match="'steps'"):
        parse_config(TrainConfig, {"data": "x", "steps": 0})


def test_later_layers_override_env_and_none_does_not(monkeypatch):
    monkeypatch.setenv("PILOT_STEPS", "7")
    monkeypatch.setenv("PILOT_SEED", "5")
    config = build_config(TrainConfig, {"data": "x", "steps": None}, {"seed": 9})
    assert config.steps == 7  # from env: the flag was not given
    assert config.seed == 9  # the flag wins over env


def test_total_batch_tokens_must_divide():
    config = parse_config(TrainConfig, {"data": "x", "batch-size": 4, "seq-len": 32, "total-batch-tokens": 512})
    assert config.resolve_grad_accum(world_size=2) == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        config.resolve_grad_accum(world_size=3)
    with pytest.raises(ConfigError, match="either grad-accum or total-batch-tokens"):
        parse_config(TrainConfig, {"data": "x", "grad-accum": 2, "total-batch-tokens": 512})
