"""Structured logging for every Pilot process.

``configure(service=...)`` sets up structlog once per process: JSON lines when
stderr is not a TTY (services, CI, containers), a readable console renderer on
a TTY. Every record carries the service name, and the run id and round when
they are known (``bind_run`` adds them to all later records of the process).

Use ``get_logger(__name__)`` in modules; never create a second logger setup.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure(service: str, *, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog and stdlib logging for this process (idempotent)."""
    global _configured
    level_name = (level or os.environ.get("PILOT_LOG_LEVEL", "INFO")).upper()
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level_name, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def bind_run(run_id: str | None = None, round: int | None = None, **extra: Any) -> None:
    """Attach run id / round (and any extra fields) to every later record."""
    fields: dict[str, Any] = dict(extra)
    if run_id is not None:
        fields["run_id"] = run_id
    if round is not None:
        fields["round"] = round
    structlog.contextvars.bind_contextvars(**fields)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    if not _configured:
        configure(service=os.environ.get("PILOT_SERVICE", "pilot"))
    return structlog.get_logger(name)
