"""The Flower app's run-config defaults in pyproject.toml stay in step with RunConfig."""

from __future__ import annotations

from pathlib import Path

from pilot.config import kebab
from pilot.flower import app_run_config_defaults
from pilot.run_config import SEED_KEYS, IGNORED_SEED_KEYS, RunConfig, run_config_from

REPO = Path(__file__).resolve().parents[2]


def test_every_run_config_key_has_a_flower_default():
    defaults = app_run_config_defaults(REPO)
    missing = {kebab(name) for name in RunConfig.model_fields} - set(defaults)
    assert not missing, f"add to [tool.flwr.app.config]: {sorted(missing)}"


def test_flower_defaults_build_a_valid_config_equal_to_pilots_defaults():
    defaults = app_run_config_defaults(REPO)
    cfg = run_config_from(defaults, source="pyproject")
    assert cfg == run_config_from({"data": "shakespeare"})  # the pyproject defaults are Pilot's defaults
    assert cfg.outer_lr_value == 1.0 and cfg.outer_momentum_value == 0.0
    seed_keys = {k for k in defaults if k.replace("-", "_") in SEED_KEYS or k.replace("-", "_") in IGNORED_SEED_KEYS}
    assert seed_keys == {"task_type", "model_type", "dataset_name", "num_shards", "num_rounds", "num-server-rounds",
                         "max_length", "gradient_accumulation_steps", "lr", "max-steps"}
