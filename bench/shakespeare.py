"""The Tiny-Shakespeare task against the Flower NanoGPT example: one configuration, its per-round table.

Runs ``pilot run --task shakespeare`` through the launcher API (real Redis,
SuperLink, SuperNodes, a fresh ClientApp process per round, inline evaluation
of every round's checkpoint on the whole validation split), then prints one
JSON object (configuration, machine, wall time, per round: train loss, val
loss, perplexity, val BPB; the final 200-character sample) and the markdown
rows for docs/results/shakespeare.md.

Configurations (``--config``):

- ``reproduce``: the example's setup, which is the task's defaults: 6×6×384 char
  GPT (Pilot's nanochat blocks), AdamW lr 1e-3, dropout 0.2, batch 64 × 256,
  FedAvg, 2 trainers × 5 rounds × 50 steps.
- ``muon-diloco``: Pilot's nanochat recipe at the same budget: Muon for the
  matrices (AdamW for embeddings), DiLoCo outer step (Nesterov, lr 0.7,
  momentum 0.9). At a quarter of the budget it lost to ``reproduce``
  (docs/results/shakespeare.md).

``--batch-size``, ``--round-steps``, ``--rounds``, ``--preset`` shrink the budget
for a quick look (the table then says so); ``--set "k=v ..."`` overrides any
run-config key.

    .venv/bin/python bench/shakespeare.py --config reproduce            # the full budget (~8.2M tokens)
    .venv/bin/python bench/shakespeare.py --config muon-diloco --batch-size 16  # 1/4 of it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pilot.eventlog import event_log_path, read_event_log
from pilot.launcher import run_local
from pilot.log import configure
from pilot.run_config import run_config_from

CONFIGS: dict[str, dict[str, Any]] = {
    "reproduce": {},  # the task's defaults are the example's configuration
    "muon-diloco": {"optimizer": "muon", "outer": "diloco"},
}
EXAMPLE = [  # the Flower NanoGPT example's README table (CPU): round, train loss, val loss, perplexity
    (0, None, 4.23, 69.0), (1, 3.26, 2.97, 19.5), (2, 2.74, 2.64, 14.0), (3, 2.60, 2.56, 13.0),
    (4, 2.53, 2.52, 12.5), (5, 2.50, 2.52, 12.4),
]


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    return f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def rounds_from_log(run_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """Per round: train loss (RoundClosed), val loss / perplexity / BPB (EvalCompleted); and the last sample."""
    rows: dict[int, dict[str, Any]] = {}
    sample = ""
    for record in read_event_log(event_log_path(run_dir)):
        event, kind = record["event"], record["type"]
        number = int(event.get("round", 0))
        if kind == "RoundClosed":
            rows.setdefault(number, {"round": number})["train_loss"] = float(event.get("mean_loss", "nan"))
        elif kind == "EvalCompleted" and event.get("status") == "EVAL_STATUS_OK":
            row = rows.setdefault(number, {"round": number})
            row["val_loss"] = float(event.get("val_loss", 0.0))
            row["perplexity"] = math.exp(row["val_loss"])
            row["val_bpb"] = float(event.get("bpb", 0.0))
            sample = str(event.get("sample", ""))
    return [rows[n] for n in sorted(rows)], sample


def markdown(result: dict[str, Any]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    lines = ["| Round | Example train | Example val | Example ppl | Pilot train | Pilot val | Pilot ppl | Pilot val BPB |",
             "|---|---|---|---|---|---|---|---|"]
    ours = {r["round"]: r for r in result["rounds"]}
    for number in sorted(set(ours) | {r[0] for r in EXAMPLE}):
        ex = next((r for r in EXAMPLE if r[0] == number), (number, None, None, None))
        row = ours.get(number, {})
        lines.append(f"| {number} | {cell(ex[1], '.2f')} | {cell(ex[2], '.2f')} | {cell(ex[3], '.1f')} | "
                     f"{cell(row.get('train_loss'), '.2f')} | {cell(row.get('val_loss'), '.2f')} | "
                     f"{cell(row.get('perplexity'), '.1f')} | {cell(row.get('val_bpb'), '.3f')} |")
    last = result["rounds"][-1] if result["rounds"] else {}
    lines += ["", "| configuration | tokens | final val loss | final perplexity | wall s | machine |",
              "|---|---|---|---|---|---|",
              f"| {result['config']} | {result['tokens']:,} | {cell(last.get('val_loss'), '.3f')} | "
              f"{cell(last.get('perplexity'), '.2f')} | {result['wall_s']:.0f} | {result['machine']} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reproduce")
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="default: the task's 5")
    parser.add_argument("--round-steps", type=int, default=None, help="default: the task's 50")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the task's 64")
    parser.add_argument("--preset", default=None, help="default: the task's shakespeare-char")
    parser.add_argument("--data", default=None, help="Tiny Shakespeare input.txt (default: fetched on first use)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", default="", help='more run-config keys: "k=v k2=v2"')
    parser.add_argument("--out", type=Path, default=None, help="run dir (default: a temporary directory)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    configure(service="bench")

    from flwr.common.config import parse_config_args

    values: dict[str, Any] = {"task": "shakespeare", "device": args.device, "min-trainers": args.trainers,
                              "run-id": f"shakespeare-{args.config}", "fresh": True, **CONFIGS[args.config]}
    for key, value in (("rounds", args.rounds), ("round-steps", args.round_steps), ("batch-size", args.batch_size),
                       ("preset", args.preset), ("data", args.data)):
        if value is not None:
            values[key] = value
    values.update(parse_config_args([args.set]) if args.set else {})
    with tempfile.TemporaryDirectory(prefix="bench-shakespeare-") as scratch:
        out = args.out or Path(scratch) / "run"
        cfg = run_config_from({**values, "out": str(out)}, source="bench")
        started = time.monotonic()
        result = run_local(cfg, args.trainers, live=False)
        wall = time.monotonic() - started
        rows, sample = rounds_from_log(result.run_dir)
    tokens = cfg.rounds * args.trainers * cfg.round_steps * cfg.batch_size * cfg.seq_len * (cfg.grad_accum or 1)
    full = (cfg.rounds, cfg.round_steps, cfg.batch_size, cfg.seq_len, args.trainers) == (5, 50, 64, 256, 2)
    report = {
        "config": args.config, "full_budget": full, "tokens": tokens, "wall_s": round(wall, 1), "machine": machine(),
        "command": "python bench/shakespeare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "run_config": {k: v for k, v in cfg.as_run_config().items() if k not in ("redis-url", "out")},
        "rounds": rows, "sample": sample,
    }
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print()
    if not full:
        print(f"(reduced budget: {tokens:,} tokens, not the example's 8,192,000)")
    print(markdown(report))


if __name__ == "__main__":
    main()
