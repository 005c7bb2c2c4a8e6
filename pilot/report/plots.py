"""The report's PNG plots, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each function takes a :class:`~pilot.report.summary.RunSummary` and a path,
draws one figure and returns the path, or returns a sentence saying why there
is nothing to draw (the report prints it instead of the image):

- :func:`plot_bpb`              validation BPB against round and against training tokens
- :func:`plot_train_loss`       training loss per trainer against that trainer's tokens
- :func:`plot_tokens`           tokens trained per trainer per round (stacked bars)
- :func:`plot_round_timing`     round wall time split into training and overhead

Figures are built on ``matplotlib.figure.Figure`` with an explicit
``FigureCanvasAgg``, so plotting from a background thread of ``pilot run`` never
touches a GUI backend or pyplot's global figure list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pilot.report.summary import EVAL_OK, RunSummary

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGSIZE = (9.0, 4.5)  # inches; at DPI this is 900 x 450 pixels
DPI = 100

PlotResult = Path | str  # the written file, or why nothing was drawn


def _figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    tmp.replace(path)
    return path


def _int_ticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_bpb(summary: RunSummary, path: Path) -> PlotResult:
    points = [e for e in summary.evals if e.status == EVAL_OK and e.bpb is not None]
    if not points:
        return "no evaluation results yet"
    fig, (by_round, by_tokens) = _figure(2)
    rounds = [p.round for p in points]
    bpb = [p.bpb for p in points]
    by_round.plot(rounds, bpb, marker="o")
    by_round.set(xlabel="round", ylabel="validation bits per byte", title="Val BPB by round")
    _int_ticks(by_round)
    with_tokens = [(summary.rounds[p.round].total_tokens, p.bpb) for p in points
                   if summary.rounds[p.round].total_tokens is not None]
    if with_tokens:
        by_tokens.plot([t for t, _ in with_tokens], [b for _, b in with_tokens], marker="o", color="tab:green")
    else:
        by_tokens.text(0.5, 0.5, "no token counts in the event log", ha="center", va="center",
                       transform=by_tokens.transAxes)
    by_tokens.set(xlabel="training tokens", ylabel="validation bits per byte", title="Val BPB by tokens")
    for ax in (by_round, by_tokens):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_train_loss(summary: RunSummary, path: Path) -> PlotResult:
    if not any(summary.progress.values()):
        return "no trainer progress in the event log"
    fig, (ax,) = _figure()
    for trainer, points in sorted(summary.progress.items()):
        done_before: dict[int, int] = {}  # round -> this trainer's tokens in earlier rounds
        finished = 0
        xs, ys = [], []
        for point in points:
            if point.round not in done_before:
                done_before[point.round] = finished
            xs.append(done_before[point.round] + point.tokens)
            ys.append(point.loss)
            finished = max(finished, done_before[point.round] + point.tokens)
        ax.plot(xs, ys, label=trainer, linewidth=1.2)
    ax.set(xlabel="tokens trained by the trainer", ylabel="training loss (nats/token)",
           title="Training loss per trainer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_tokens(summary: RunSummary, path: Path) -> PlotResult:
    rows = [r for r in summary.ordered_rounds if r.tokens_by_trainer or r.tokens]
    if not rows:
        return "no token counts in the event log"
    fig, (ax,) = _figure()
    rounds = [r.round for r in rows]
    bottom = [0.0] * len(rows)
    for trainer in summary.trainers:
        heights = [float(r.tokens_by_trainer.get(trainer, 0)) for r in rows]
        if any(heights):
            ax.bar(rounds, heights, bottom=bottom, label=trainer)
            bottom = [b + h for b, h in zip(bottom, heights)]
    closed = [(r.round, r.tokens) for r in rows if r.tokens is not None]
    if closed:
        ax.plot([r for r, _ in closed], [t for _, t in closed], "k_", markersize=18, mew=2,
                label="aggregated (RoundClosed)")
    ax.set(xlabel="round", ylabel="tokens", title="Tokens trained per trainer per round")
    _int_ticks(ax)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_round_timing(summary: RunSummary, path: Path) -> PlotResult:
    rows = [r for r in summary.ordered_rounds if r.wall_s is not None]
    if not rows:
        return "no closed rounds in the event log"
    fig, (ax,) = _figure()
    rounds = [r.round for r in rows]
    train = [r.train_s or 0.0 for r in rows]
    overhead = [r.overhead_s if r.overhead_s is not None else (r.wall_s or 0.0) for r in rows]
    ax.bar(rounds, train, label="training (slowest trainer)", color="tab:blue")
    ax.bar(rounds, overhead, bottom=train, label="overhead (start-up, upload, aggregation)", color="tab:orange")
    ax.set(xlabel="round", ylabel="seconds", title="Round time: training vs overhead")
    _int_ticks(ax)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _save(fig, path)


PLOTS: dict[str, tuple[str, Callable[[RunSummary, Path], PlotResult]]] = {
    "val_bpb.png": ("Validation bits per byte", plot_bpb),
    "train_loss.png": ("Training loss per trainer", plot_train_loss),
    "tokens_per_trainer.png": ("Tokens per trainer per round", plot_tokens),
    "round_timing.png": ("Round timing", plot_round_timing),
}
"""File name -> (title, function), in report order."""
