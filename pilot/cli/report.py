"""``pilot report RUN_DIR``: write the run's report (report.md + PNG plots) from its event log.

With ``--redis URL`` the evaluator's stored results for the run (``--run``,
default: the run directory's name) are merged in, so a round whose
``EvalCompleted`` the event log missed still shows its BPB. Prints the path of
the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pilot.cli.common import user_errors


def _stored_results(redis_url: str, run_id: str) -> list[dict[str, Any]]:
    from pilot.bus import redis_client
    from services.evaluator.results import ResultStore

    client = redis_client(redis_url)
    try:
        return [result.to_dict() for result in ResultStore(client, run_id).all()]
    finally:
        client.close()


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="run directory (holds events.jsonl)", show_default=False)],
    redis: Annotated[Optional[str], typer.Option("--redis", help="also read the evaluator's stored results here")]
    = None,
    run: Annotated[Optional[str], typer.Option("--run", help="run id for --redis (default: the directory's name)")]
    = None,
) -> None:
    """Write <RUN_DIR>/report.md and its plots."""
    with user_errors():
        from pilot.report import write_report

        results = _stored_results(redis, run or run_dir.name) if redis else None
        path = write_report(run_dir, eval_results=results)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add `report` to the main `pilot` app."""
    app.command("report")(report_command)
