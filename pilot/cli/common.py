"""What every ``pilot`` command shares: turning library errors into one clear line.

``with user_errors():`` around a command body prints a :class:`~pilot.errors.PilotError`
as ``error: <message>`` on stderr and exits with code 2 (no traceback): the
message already names the bad key, path or checksum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from pilot.errors import PilotError

USER_ERROR_EXIT = 2


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except PilotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=USER_ERROR_EXIT) from None
