"""The typed config of a federated run, from Flower run-config, ``pilot run`` flags and env.

:class:`RunConfig` = the training knobs every trainer shares
(:class:`~pilot.train_config.TrainingKnobs`) + the federation's own: rounds by
time (``round-seconds``) or by steps (``round-steps``), ``min-trainers``, the
outer optimiser (``fedavg`` | ``diloco``), the update encoding, where Redis and
the run dir are. It is built once, in the coordinator, by :func:`run_config_from`
and travels to trainers inside each round's Flower message, so a trainer never
parses configuration on its own.

Keys are Pilot's kebab-case ones; the seed project's snake_case keys
(``num_rounds``, ``model_type='nanochat_d20'``, ``max_length``, ``lr``...) are
accepted as documented there and translated by :data:`SEED_KEYS` (so are the Flower
NanoGPT example's ``learning-rate`` and ``block-size``). A key Pilot does not
know, or a bad value, refuses the run with a message naming the key.

**Tasks.** ``task`` picks a set of defaults (:data:`TASK_DEFAULTS`): ``pretrain``
(the default: today's behaviour) or ``shakespeare`` (the Flower NanoGPT
Tiny-Shakespeare reproduction: preset ``shakespeare-char``, char tokenizer,
batch 64 × 256, dropout 0.2, AdamW lr 1e-3, 5 rounds of 50 steps, the train part
split contiguously between the trainers, the whole validation split scored
inline by the coordinator). A task default only fills a key that was not given;
Flower's run-config has no null, so the app's pyproject lists such keys with an
"unset" marker (:data:`UNSET_MARKERS`: ``""``, ``0`` or ``-1``) that counts as
not given. ``task='shakespeare' preset='d2'`` is the task with a smaller model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pilot.config import build_config, snake
from pilot.errors import ConfigError
from pilot.train_config import TrainingKnobs

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Task = Literal["pretrain", "shakespeare"]
# What each task sets when the key is not given (snake_case keys). ``pretrain`` keeps the fields' defaults.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "shakespeare": {  # the Flower NanoGPT example: 2 clients x 5 rounds x 50 steps of 64 x 256 chars
        "data": "shakespeare",
        "preset": "shakespeare-char",
        "tokenizer": "char",
        "seq_len": 256,
        "dropout": 0.2,
        "batch_size": 64,
        "optimizer": "adamw",
        "adamw_lr": 1e-3,
        "rounds": 5,
        "round_steps": 50,
        "partition": "contiguous",
        "eval_tokens": 0,
        "eval_inline": True,
    },
}
# The value that means "not given" for keys a task may set (Flower run-config has no null): a key given
# with its marker is dropped, so the task's default (or the field's) applies.
UNSET_MARKERS: dict[str, Any] = {
    "preset": "", "tokenizer": "", "optimizer": "", "partition": "", "eval_inline": "",
    "seq_len": 0, "batch_size": 0, "rounds": 0,
    "dropout": -1, "eval_tokens": -1, "round_steps": -1,
}


def _is_unset(value: Any, marker: Any) -> bool:
    if value is None:
        return True
    if isinstance(marker, str) or isinstance(value, bool):
        return value == marker and not isinstance(value, bool)
    try:
        return float(value) == float(marker)
    except (TypeError, ValueError):
        return False


class RunConfig(TrainingKnobs):
    run_id: str = "pilot"  # names the run's Redis keys and run dir
    task: Task = "pretrain"  # pretrain | shakespeare: which defaults apply (TASK_DEFAULTS)
    # --- rounds --------------------------------------------------------------
    rounds: int = Field(3, gt=0)  # rounds to run (Flower's num-server-rounds)
    round_seconds: float = Field(300.0, gt=0)  # a round's training budget on each trainer's own clock
    round_steps: int = Field(0, ge=0)  # >0: rounds end after this many inner steps instead
    step_round_timeout_s: float = Field(3600.0, gt=0)  # a step round's longest wait for its steps (+ reply-grace-s)
    min_trainers: int = Field(1, gt=0)  # a round starts once this many trainers are connected
    trainer_wait_s: float = Field(600.0, gt=0)  # give up when min-trainers do not show up in time
    reply_grace_s: float = Field(120.0, gt=0)  # after the round's budget: wait this long for replies
    upload_margin_s: float = Field(1.0, ge=0)  # trainers stop this much before the budget, to upload
    early_start_policy: Literal["none", "joiners"] = "joiners"  # end a round early when a trainer joins
    # --- outer optimisation ----------------------------------------------------
    outer: Literal["fedavg", "diloco"] = "fedavg"
    outer_lr: float = Field(0.0, ge=0)  # 0: the outer kind's default (1.0 fedavg, 0.7 diloco)
    outer_momentum: float = Field(-1.0, ge=-1, lt=1)  # < 0: the kind's default (0 fedavg, 0.9 diloco)
    max_update_norm: float = Field(1e4, gt=0)  # replies whose pseudo-gradient L2 norm exceeds this are rejected
    # --- trainers ----------------------------------------------------------------
    update_dtype: Literal["fp32", "bf16", "int8"] = "fp32"  # pseudo-gradient encoding on the wire
    int8_block: int = Field(256, ge=0)  # int8 scale block (0: one scale per tensor)
    keep_inner_optimizer: bool = True  # keep the inner optimiser state across rounds (else reset)
    partition: Literal["ledger", "contiguous"] = "ledger"  # ledger: lease work units; contiguous: slice
    # partition-id of num-partitions of the train text (a node's data-path file: that file), random windows
    lease_seconds: float = Field(120.0, gt=0)  # a work unit's lease; renewed while training
    progress_every_s: float = Field(2.0, gt=0)  # trainers publish progress this often
    # --- services ------------------------------------------------------------------
    redis_url: str = ""  # empty: $PILOT_REDIS_URL
    out: Path | None = None  # run dir (default $PILOT_BASE_DIR/runs/<run-id>)
    evaluate: bool = True  # evaluate every round checkpoint (round 0 included)
    eval_inline: bool = False  # the coordinator scores each checkpoint itself (no Celery worker needed)
    coordinator_port: int = Field(0, ge=0, lt=65536)  # gRPC Coordinator API (0: any free port)
    keep_checkpoints: int = Field(0, ge=0)  # prune older round checkpoints (0: keep all)
    fresh: bool = False  # ignore earlier checkpoints of this run id and start at round 1
    wandb_project: str = ""  # log to wandb under this project (offline unless a key is set)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, values: Any) -> Any:
        """Keys given with their unset marker are dropped; the task's defaults fill what is missing."""
        if not isinstance(values, Mapping):
            return values
        given = {k: v for k, v in values.items() if not (k in UNSET_MARKERS and _is_unset(v, UNSET_MARKERS[k]))}
        task = given.get("task") or "pretrain"
        for key, value in TASK_DEFAULTS.get(str(task), {}).items():  # an unknown task fails on 'task' below
            given.setdefault(key, value)
        return given

    @field_validator("out", "grad_accum", mode="before")
    @classmethod
    def _empty_means_default(cls, value: Any) -> Any:
        # Flower run-config has no null: "" (paths) and 0 (counts) mean "not set"
        return None if value in ("", 0) else value

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not RUN_ID_PATTERN.match(self.run_id):
            raise ValueError(f"run-id {self.run_id!r} must match {RUN_ID_PATTERN.pattern}")
        return self

    @property
    def outer_lr_value(self) -> float:
        if self.outer_lr > 0:
            return self.outer_lr
        return 0.7 if self.outer == "diloco" else 1.0

    @property
    def outer_momentum_value(self) -> float:
        if self.outer_momentum >= 0:
            return self.outer_momentum
        return 0.9 if self.outer == "diloco" else 0.0

    def run_dir(self) -> Path:
        from pilot.paths import run_dir

        return (self.out or run_dir(self.run_id)).expanduser().resolve()

    @property
    def exact_split(self) -> bool:
        """The shakespeare task cuts train/val at a character (the example's 90/10), not between documents."""
        return self.task == "shakespeare"

    def shard_dir(self, data: str | Path | None = None) -> Path:
        """The shard directory of ``data`` (default: the run's ``data``; a name such as 'shakespeare' is
        fetched on first use, a text file imported once) as this run's task splits it."""
        from pilot.data import resolve_data
        from pilot.paths import data_dir
        from pilot.sources import resolve_named_source

        return resolve_data(resolve_named_source(data if data is not None else self.data),
                            data_dir() / "imported", exact_split=self.exact_split)


def _model_type(value: Any) -> str:
    """The seed's ``model_type`` (``nanochat_d20``) as a Pilot preset (``d20``)."""
    text = str(value)
    return text.removeprefix("nanochat_")


# seed key -> (Pilot key, value translation)
SEED_KEYS: dict[str, tuple[str, Any]] = {
    "num_rounds": ("rounds", None),
    "num_server_rounds": ("rounds", None),
    "model_type": ("preset", _model_type),
    "max_length": ("seq_len", None),
    "gradient_accumulation_steps": ("grad_accum", None),
    "lr": ("adamw_lr", None),
    "dataset_name": ("data", None),
    "max_steps": ("round_steps", None),
    # the Flower NanoGPT example's names
    "learning_rate": ("adamw_lr", None),
    "block_size": ("seq_len", None),
}
# seed keys Pilot accepts but has no use for (the value is checked for type only)
IGNORED_SEED_KEYS = {"task_type": str, "num_shards": int}


UNSET = ("", 0)  # how Flower run-config defaults say "not given" (it has no null)


def translate_seed_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """Map the seed project's run-config keys onto Pilot's; Pilot's own keys pass through.

    A seed key left at its unset default ("" or 0, as pyproject lists them) is dropped.
    """
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = snake(str(raw_key))
        if (key in SEED_KEYS or key in IGNORED_SEED_KEYS) and value in UNSET and not isinstance(value, bool):
            continue
        if key in IGNORED_SEED_KEYS:
            if not isinstance(value, IGNORED_SEED_KEYS[key]):
                raise ConfigError(f"run-config: bad value for '{raw_key}' ({value!r}): expected {IGNORED_SEED_KEYS[key].__name__}")
            continue
        if key in SEED_KEYS:
            target, convert = SEED_KEYS[key]
            out[target] = convert(value) if convert else value
        else:
            out[raw_key] = value
    return out


def run_config_from(*layers: Mapping[str, Any] | None, source: str = "run-config") -> RunConfig:
    """Build the run's config from layers (later wins), seed keys translated, env under them."""
    return build_config(RunConfig, *(translate_seed_keys(layer or {}) for layer in layers), source=source)
