"""`pilot redis` commands: run the embedded Redis, check a Redis connection.

``pilot redis serve`` starts the embedded redis-server (pilot/redis_server.py:
loopback only, password, AOF) in the foreground, prints its URL with the
password, and serves until Ctrl-C or SIGTERM. ``pilot redis ping`` checks that
a Redis URL is reachable and the password is right (exit 0), else exits 2 with
one line saying what is wrong.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from pilot.cli.common import user_errors


def serve(port: int | None, data_dir: Path | None, password: str | None) -> None:
    from pilot.paths import base_dir
    from pilot.redis_server import EmbeddedRedis

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = EmbeddedRedis(data_dir or base_dir() / "redis", port=port, password=password).start()
    try:
        typer.echo(server.url)
        typer.echo(f"# export PILOT_REDIS_URL='{server.url}'   (data in {server.data_dir}; Ctrl-C stops)", err=True)
        while not stop.wait(1.0):
            if not server.running:
                raise typer.Exit(1)
    finally:
        server.stop()


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main `pilot` app."""
    group = typer.Typer(help="The embedded Redis server and Redis connections.", no_args_is_help=True)
    app.add_typer(group, name="redis")

    @group.command("serve")
    def serve_cmd(
        port: int | None = typer.Option(None, "--port", help="TCP port on 127.0.0.1 (default: a free one)."),
        data_dir: Path | None = typer.Option(None, "--dir", help="Data dir for the AOF (default $PILOT_BASE_DIR/redis)."),
        password: str | None = typer.Option(None, "--password", help="Password (default: generated).",
                                            envvar="PILOT_REDIS_PASSWORD", show_envvar=False),
    ) -> None:
        """Serve the embedded Redis until Ctrl-C / SIGTERM; prints its URL (with the password)."""
        with user_errors():
            serve(port, data_dir, password)

    @group.command("ping")
    def ping_cmd(
        redis: str | None = typer.Option(None, "--redis", help="Redis URL (default $PILOT_REDIS_URL).",
                                         envvar="PILOT_REDIS_URL", show_envvar=False),
    ) -> None:
        """Check that Redis is reachable and accepts the password."""
        from pilot.bus.connection import redis_client, where

        with user_errors():
            client = redis_client(redis)
            info = client.info("server")
        typer.echo(f"ok: redis {info.get('redis_version', '?')} at {where(client)}")
