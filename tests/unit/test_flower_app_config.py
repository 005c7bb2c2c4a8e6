"""The Flower app's run-config defaults in pyproject.toml stay in step with RunConfig."""

from __future__ import annotations

from pathlib import Path

from pilot.config import kebab
from pilot.flower import app_run_config_defaults
from pilot.run_config import IGNORED_SEED_KEYS, SEED_KEYS, UNSET_MARKERS, RunConfig, run_config_from

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
                         "max_length", "gradient_accumulation_steps", "lr", "max-steps", "learning-rate",
                         "block-size"}


def test_keys_a_task_sets_are_listed_unset_so_the_task_default_applies():
    defaults = app_run_config_defaults(REPO)
    for name, marker in UNSET_MARKERS.items():
        assert defaults[kebab(name)] == marker, f"[tool.flwr.app.config] {kebab(name)} must be {marker!r} (unset)"
    shakespeare = run_config_from(defaults, {"task": "shakespeare"}, source="pyproject")
    assert shakespeare.preset == "shakespeare-char" and shakespeare.eval_inline and shakespeare.round_steps == 50
