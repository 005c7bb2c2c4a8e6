"""The run report: ``<run_dir>/report.md`` plus PNG plots in ``<run_dir>/plots/``.

Built from the run's event log (``<run_dir>/events.jsonl``, written by
:class:`pilot.eventlog.EventLogWriter`) and, when given, the evaluator's stored
results for the run (the JSON objects of ``pilot:<run>:eval:results``)::

    from pilot.report import write_report
    path = write_report(run_dir)                       # what `pilot run` calls at the end
    path = write_report(run_dir, eval_results=[...])   # `pilot report RUN_DIR --redis URL`

The report holds the run's facts, a table per round (tokens, trainers, mean
training loss, val BPB, wall seconds), four plots (val BPB by round and by
tokens, training loss per trainer, tokens per trainer per round, round timing
as training vs overhead) and the latest text sample. Missing pieces (no event
log, no evaluation yet, no trainer progress) are said in words, never an error.

- ``summary``  event-log records -> ``RunSummary``
- ``plots``    ``RunSummary`` -> PNGs (matplotlib Agg canvas)
- ``render``   ``RunSummary`` + plot outcomes -> markdown
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pilot.errors import DataError
from pilot.eventlog import event_log_path, read_event_log
from pilot.log import get_logger
from pilot.report.plots import PLOTS
from pilot.report.render import render_markdown
from pilot.report.summary import RunSummary, summarize

log = get_logger(__name__)

REPORT_NAME = "report.md"
PLOTS_SUBDIR = "plots"

__all__ = ["PLOTS_SUBDIR", "REPORT_NAME", "RunSummary", "summarize", "write_report"]


def write_report(run_dir: str | Path, *, eval_results: Iterable[Mapping[str, Any]] | None = None) -> Path:
    """Write ``<run_dir>/report.md`` and its plots; returns the report's path.

    Raises DataError when ``run_dir`` is not a directory; corrupt event-log lines are skipped.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist")
    log_path = event_log_path(run_dir)
    has_log = log_path.is_file()
    records = read_event_log(log_path, strict=False) if has_log else []
    summary = summarize(records, eval_results or ())
    plots_dir = run_dir / PLOTS_SUBDIR
    outcomes: dict[str, tuple[str, Path | str]] = {}
    for name, (title, draw) in PLOTS.items():
        target = plots_dir / name
        outcome = draw(summary, target)
        if isinstance(outcome, str) and target.exists():
            target.unlink()  # an old plot would contradict "not drawn"
        outcomes[name] = (title, outcome)
    text = render_markdown(summary, outcomes, run_dir, has_log=has_log, log_path=log_path)
    report = run_dir / REPORT_NAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{REPORT_NAME}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, report)
    log.info("report written", path=str(report), rounds=len(summary.rounds), events=summary.events,
             plots=sum(isinstance(o, Path) for _, o in outcomes.values()))
    return report
