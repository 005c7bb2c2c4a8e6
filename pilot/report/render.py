"""The report's markdown: run facts, the per-round table(s), plots, the final text sample, notes.

A ``shakespeare`` task run also gets the Flower NanoGPT example's table (Round |
Train Loss | Val Loss | Perplexity), so the two read side by side.

:func:`render_markdown` turns a :class:`~pilot.report.summary.RunSummary` and the
plot outcomes (a written file, or why none was drawn) into ``report.md``. Every
missing piece is said in words ("no evaluation results yet") rather than left
as an empty section, so a report written mid-run or after a crash still reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from pilot.report.summary import EVAL_OK, RoundRow, RunSummary

DASH = "–"


def _num(value: float | int | None, fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def _bpb_cell(row: RoundRow) -> str:
    if row.eval is None:
        return DASH
    if row.eval.status != EVAL_OK:
        return "failed"
    return _num(row.eval.bpb, ".4f")


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _facts(summary: RunSummary, run_dir: Path) -> list[str]:
    closed = [r for r in summary.ordered_rounds if r.closed]
    total_tokens = max((r.total_tokens or 0 for r in summary.ordered_rounds), default=0)
    latest = summary.latest_ok_eval
    planned = f" of {summary.planned_rounds} planned" if summary.planned_rounds else ""
    facts = [
        ("run directory", f"`{run_dir}`"),
        ("model", summary.model or DASH),
        ("outer optimiser", summary.strategy or DASH),
        ("rounds closed", f"{len(closed)}" + planned),
        ("training tokens", f"{total_tokens:,}" if total_tokens else DASH),
        ("trainers", ", ".join(summary.trainers) or DASH),
        ("latest val BPB", f"{latest.bpb:.4f} (round {latest.round})" if latest and latest.bpb is not None else
         "no evaluation results yet"),
    ]
    if summary.resumed_from_round:
        facts.append(("resumed from round", str(summary.resumed_from_round)))
    if summary.stopped is not None:
        reason = str(summary.stopped.get("reason", "STOP_REASON_UNSPECIFIED")).removeprefix("STOP_REASON_").lower()
        detail = summary.stopped.get("detail")
        facts.append(("run ended", reason + (f": {detail}" if detail else "")))
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in facts]
    return lines


def _round_table(summary: RunSummary) -> list[str]:
    rows = summary.ordered_rounds
    if not rows:
        return ["No rounds in the event log yet."]
    lines = [
        "| round | tokens | total tokens | trainers | mean train loss | val BPB | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        trainers = len(row.trainers) if row.trainers else len(row.tokens_by_trainer) or None
        lines.append(
            f"| {row.round} | {_num(row.tokens, ',')} | {_num(row.total_tokens, ',')} | {_num(trainers, 'd')} | "
            f"{_num(row.loss, '.4f')} | {_bpb_cell(row)} | {_num(row.wall_s, '.1f')} |"
        )
    evals = [e for e in summary.evals if e.status == EVAL_OK]
    if evals:
        last = evals[-1]
        scope = {True: "a seeded sample of ", False: "the whole split, ", None: ""}[last.sampled]
        lines += ["", f"Val BPB: bits per byte on {scope}{last.val_tokens:,} validation tokens, "
                  "the same tokens every round."]
    return lines


def _loss_table(summary: RunSummary) -> list[str]:
    """Round | Train Loss | Val Loss | Perplexity (the Flower NanoGPT example's table)."""
    lines = ["| Round | Train Loss | Val Loss | Perplexity |", "|---|---|---|---|"]
    for row in summary.ordered_rounds:
        ok = row.eval if row.eval is not None and row.eval.status == EVAL_OK else None
        lines.append(f"| {row.round} | {_num(row.loss, '.2f')} | {_num(ok.loss if ok else None, '.2f')} | "
                     f"{_num(ok.perplexity if ok else None, '.1f')} |")
    lines += ["", "Train loss: the token-weighted mean over every inner step of the round, all trainers. "
              "Val loss: mean nats per character on the whole validation split (the last 10 % of the text), in "
              "non-overlapping windows of seq-len characters; perplexity = exp(val loss)."]
    return lines


def _plots(plots: Mapping[str, tuple[str, Path | str]], run_dir: Path) -> list[str]:
    lines: list[str] = []
    for title, outcome in plots.values():
        lines += [f"### {title}", ""]
        if isinstance(outcome, Path):
            lines.append(f"![{title}]({outcome.relative_to(run_dir).as_posix()})")
        else:
            lines.append(f"_Not drawn: {outcome}._")
        lines.append("")
    return lines


def _sample(summary: RunSummary) -> list[str]:
    latest = summary.latest_ok_eval
    if latest is None:
        return ["No evaluation results yet, so no text sample."]
    if not latest.sample:
        return [f"The round {latest.round} evaluation generated no text sample."]
    text = latest.prompt + latest.sample
    fence = _fence(text)
    return [f"From the round {latest.round} checkpoint (prompt: `{latest.prompt!r}`):" if latest.prompt else
            f"From the round {latest.round} checkpoint:", "", f"{fence}text", text, fence]


def _notes(summary: RunSummary, has_log: bool, log_path: Path) -> list[str]:
    notes = []
    if not has_log:
        notes.append(f"No event log at `{log_path}`: rounds, losses and timings are unknown.")
    notes += [f"Evaluation of round {e.round} failed: {e.reason}" for e in summary.evals if e.status != EVAL_OK]
    notes += [f"Update of {t} in round {r} rejected: {reason}" for t, r, reason in summary.rejected]
    if summary.undecodable:
        notes.append(f"{summary.undecodable} event-log entries could not be decoded (see `pilot events tail`).")
    return [f"- {note}" for note in notes] or ["None."]


def render_markdown(
    summary: RunSummary, plots: Mapping[str, tuple[str, Path | str]], run_dir: Path, *, has_log: bool, log_path: Path
) -> str:
    """The whole ``report.md``."""
    title = summary.run_id or run_dir.name
    parts = [
        [f"# Pilot run report: {title}", ""],
        _facts(summary, run_dir), [""],
        ["## Rounds", ""], _round_table(summary), [""],
        (["## Loss", ""] + _loss_table(summary) + [""]) if summary.task == "shakespeare" else [],
        ["## Plots", ""], _plots(plots, run_dir),
        ["## Text sample", ""], _sample(summary), [""],
        ["## Notes", ""], _notes(summary, has_log, log_path), [""],
    ]
    return "\n".join(line for part in parts for line in part)
