"""The ``pilot`` command: one CLI, one sub-command group per concern.

Each concern lives in its own module under ``pilot/cli/`` and exposes a
``register(app)`` function. Heavy imports (torch, flwr, grpc) happen inside the
commands, so ``pilot --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="pilot",
    help="Pilot: federated GPT pretraining for GPU machines that come and go.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per concern; each defines register(app).
_COMMAND_MODULES = (
    "train",
    "model",
    "data",
    "checkpoint",
    "tokenizer",
    "events",
    "redis",
    "evaluator",
    "report",
    "control",
    "run",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(f"pilot.cli.{_name}").register(app)


def main() -> None:
    app()
