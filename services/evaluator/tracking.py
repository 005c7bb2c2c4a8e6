"""Weights & Biases logging of evaluation results (optional, offline by default).

One wandb run per Pilot run (id ``<run_id>-eval``, group ``<run_id>``, job type
``eval``), opened on the first result of that run and kept open while the
worker lives (``close()`` finishes them all at worker shutdown). Each result is
logged with two x-axes: ``round`` (``eval/bpb``) and training ``tokens``
(``eval_by_tokens/bpb``), plus seconds, validation tokens and the text sample.

Mode: ``$WANDB_MODE`` when set; otherwise ``online`` when ``$WANDB_API_KEY`` is
set, else ``offline`` (the run is written under ``<dir>/wandb/offline-run-*``
and can be uploaded later with ``wandb sync``). A wandb failure is logged and
never fails an evaluation.
"""

from __future__ import annotations

import html
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot import paths
from pilot.log import get_logger

from services.evaluator.results import EvalResult

log = get_logger(__name__)

DEFAULT_PROJECT = "pilot"


def wandb_mode() -> str:
    """``$WANDB_MODE``, else online with an API key, else offline."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return explicit
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


@dataclass(frozen=True)
class WandbSettings:
    enabled: bool = True
    project: str = DEFAULT_PROJECT
    directory: Path = field(default_factory=lambda: paths.base_dir() / "wandb")  # runs go to <directory>/wandb/
    entity: str | None = None


class WandbTracker:
    """Logs :class:`EvalResult` s to one wandb run per Pilot run."""

    def __init__(self, settings: WandbSettings) -> None:
        self.settings = settings
        self._runs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _run(self, run_id: str) -> Any:
        import wandb

        if run_id not in self._runs:
            self.settings.directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.settings.project,
                entity=self.settings.entity,
                name=f"{run_id}-eval",
                id=f"{run_id}-eval",
                group=run_id,
                job_type="eval",
                dir=str(self.settings.directory),
                mode=wandb_mode(),  # type: ignore[arg-type]
                reinit="create_new",
                resume="allow",
                config={"pilot_run_id": run_id},
            )
            run.define_metric("round")
            run.define_metric("tokens")
            run.define_metric("eval/*", step_metric="round")
            run.define_metric("eval_by_tokens/*", step_metric="tokens")
            self._runs[run_id] = run
            log.info("wandb run opened", run_id=run_id, mode=wandb_mode(), dir=str(run.dir))
        return self._runs[run_id]

    def log(self, result: EvalResult) -> None:
        """Log one successful result (failures are only counted)."""
        if not self.settings.enabled:
            return
        try:
            import wandb

            with self._lock:
                run = self._run(result.run_id)
                if not result.ok:
                    run.log({"round": result.round, "eval/failed": 1})
                    return
                run.log({
                    "round": result.round,
                    "tokens": result.checkpoint_tokens,
                    "eval/bpb": result.bpb,
                    "eval/loss": result.loss,
                    "eval/seconds": result.eval_s,
                    "eval/val_tokens": result.tokens,
                    "eval/sample": wandb.Html(f"<pre>{html.escape(result.sample)}</pre>"),
                    "eval_by_tokens/bpb": result.bpb,
                })
                run.summary["last_sample"] = result.sample
        except Exception as exc:  # wandb is a side channel: never fail the evaluation for it
            log.warning("wandb logging failed", run_id=result.run_id, round=result.round, error=repr(exc))

    def close(self) -> None:
        """Finish every open wandb run (flushes the offline files)."""
        with self._lock:
            for run_id, run in list(self._runs.items()):
                try:
                    run.finish()
                except Exception as exc:
                    log.warning("wandb finish failed", run_id=run_id, error=repr(exc))
            self._runs.clear()
