"""Drive a real Flower 1.41 deployment from Pilot: start daemons, submit and watch runs.

- :mod:`pilot.flower.launch` -- :class:`LocalFederation`: SuperLink + N SuperNodes on
  free loopback ports as child process trees, ``submit`` / ``wait`` / ``stop_run``,
  ``kill_node`` / ``start_node``; nothing left running after the ``with`` block.
- :mod:`pilot.flower.runs` -- :class:`RunStatus`, the Control API in-process
  (:class:`ControlClient`) and the ``flwr run/ls/stop/log`` CLI wrappers.
- :mod:`pilot.flower.runconfig` -- ``--run-config`` quoting and checks against the
  app's ``[tool.flwr.app.config]``.
- :mod:`pilot.flower.procs` -- child processes in their own session, tree kill.
"""

from pilot.flower.launch import LocalFederation
from pilot.flower.procs import leftover_processes
from pilot.flower.runconfig import (
    app_run_config_defaults,
    check_run_config,
    format_run_config,
    toml_value,
    write_run_config_toml,
)
from pilot.flower.runs import (
    CONNECTION,
    ControlClient,
    FlowerError,
    RunStatus,
    RunTimeout,
    flwr_log,
    flwr_ls,
    flwr_run,
    flwr_stop,
    flower_env,
    write_connection,
)

__all__ = [
    "CONNECTION",
    "ControlClient",
    "FlowerError",
    "LocalFederation",
    "RunStatus",
    "RunTimeout",
    "app_run_config_defaults",
    "check_run_config",
    "flower_env",
    "flwr_log",
    "flwr_ls",
    "flwr_run",
    "flwr_stop",
    "format_run_config",
    "leftover_processes",
    "toml_value",
    "write_connection",
    "write_run_config_toml",
]
