"""Per-round fixed overhead and trainer utilisation of a federated run on this machine.

Runs ``pilot run`` (real Redis, SuperLink, SuperNodes, a fresh ClientApp process
per round) with the d4 preset and 2 trainers for a few rounds at each round
length, then reads every round checkpoint's sidecar: the coordinator's round
wall time and each trainer's train / setup seconds.

``--trainer-host`` picks the trainer process model per measurement (sets
``$PILOT_TRAINER_HOST`` for the run): ``auto`` (the default: the thin ClientApp
hands rounds to a long-lived trainer host per node) and/or ``off`` (the whole
round in the per-message ClientApp process: imports and optimiser set-up paid
every round). Several modes are measured one after another per round length, so
they see similar load; the box's 1-minute load average is recorded before and
after each.

- fixed overhead = round wall seconds − mean trainer train seconds (ClientApp
  start, weight load, data lease, upload, validation, aggregation, checkpoint);
- utilisation = mean train seconds / round wall seconds;
- the same for the rounds after the first (the first also starts each node's
  trainer host, once per run), which is what long runs see.

Bytes per update for each encoding come from ``bench/update_codec.py``.
Prints one JSON object per round length and a markdown table.

    .venv/bin/python bench/round_overhead.py --round-seconds 30 120 --rounds 2 --trainer-host off auto
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from pilot.checkpoint import read_checkpoint_meta
from pilot.checkpoint.rundir import checkpoints_dir, list_checkpoints
from pilot.launcher import run_local
from pilot.log import configure
from pilot.run_config import run_config_from

REPO = Path(__file__).resolve().parents[1]


def measure(round_seconds: float, rounds: int, trainers: int, data: Path, work: Path, mode: str) -> dict:
    name = f"overhead-{mode}-{int(round_seconds)}"
    cfg = run_config_from({
        "run-id": name, "data": str(data), "out": str(work / name),
        "preset": "d4", "seq-len": 128, "batch-size": 8, "rounds": rounds, "round-seconds": round_seconds,
        "min-trainers": trainers, "evaluate": False, "device": "cpu", "early-start-policy": "none",
    })
    os.environ["PILOT_TRAINER_HOST"] = mode  # inherited by the SuperNodes and their ClientApps
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    run_local(cfg, trainers, live=False)
    total = time.monotonic() - started
    load_after = os.getloadavg()[0]
    rows = []
    for number, path in list_checkpoints(checkpoints_dir(cfg.run_dir())):
        if number == 0:
            continue
        extra = read_checkpoint_meta(path).extra
        reports = list(extra["reports"].values())  # accepted replies only
        # a trainer without an accepted reply (empty: its set-up outlasted the budget; or failed) trained 0 s
        train = sum(r["train_seconds"] for r in reports) / trainers
        setup = statistics.mean(r["setup_seconds"] for r in reports) if reports else float("nan")
        rows.append({"round": number, "wall_s": extra["wall_s"], "train_s": train, "setup_s": setup,
                     "accepted": len(reports), "rejected": extra.get("rejected", {})})
    wall = statistics.mean(r["wall_s"] for r in rows)
    train = statistics.mean(r["train_s"] for r in rows)
    later = rows[1:] or rows  # rounds after the first: trainer processes (hosts) already running
    later_wall, later_train = statistics.mean(r["wall_s"] for r in later), statistics.mean(r["train_s"] for r in later)
    return {
        "trainer_host": mode, "round_seconds": round_seconds, "rounds": rounds, "trainers": trainers, "preset": "d4",
        "mean_round_wall_s": round(wall, 2), "mean_train_s": round(train, 2),
        "fixed_overhead_s": round(wall - train, 2), "utilisation": round(train / wall, 4),
        "later_rounds_fixed_overhead_s": round(later_wall - later_train, 2),
        "later_rounds_utilisation": round(later_train / later_wall, 4),
        "mean_trainer_setup_s": round(statistics.mean([r["setup_s"] for r in rows if not math.isnan(r["setup_s"])]
                                                      or [math.nan]), 2),
        "accepted_replies": f"{sum(r['accepted'] for r in rows)}/{trainers * len(rows)}",
        "run_wall_s": round(total, 1), "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "per_round": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-seconds", type=float, nargs="+", default=[30.0, 120.0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--trainer-host", nargs="+", choices=["auto", "off"], default=["auto"],
                        help="trainer process model(s) to measure: auto = long-lived host, off = per message")
    parser.add_argument("--work", type=Path, help="keep the runs (logs, checkpoints) here; default: a temp dir")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
    args = parser.parse_args()
    configure(service="bench", level="WARNING")
    results = []
    with tempfile.TemporaryDirectory(prefix="pilot-overhead-") as tmp:
        tmp = str(args.work or tmp)
        for seconds in args.round_seconds:
            for mode in args.trainer_host:
                result = measure(seconds, args.rounds, args.trainers, args.data, Path(tmp), mode)
                print(json.dumps(result), flush=True)
                results.append(result)
    print("\n| trainer host | round s | rounds | trainers | replies accepted | mean round wall s | mean train s "
          "| mean setup s | fixed overhead s | utilisation | rounds 2+: overhead s / utilisation "
          "| load avg (1 min, before→after) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        load = "→".join(f"{x:g}" for x in r["load_avg_1m"])
        print(f"| {r['trainer_host']} | {r['round_seconds']:g} | {r['rounds']} | {r['trainers']} | "
              f"{r['accepted_replies']} | "
              f"{r['mean_round_wall_s']} | {r['mean_train_s']} | {r['mean_trainer_setup_s']} | "
              f"{r['fixed_overhead_s']} | {r['utilisation']:.1%} | "
              f"{r['later_rounds_fixed_overhead_s']} / {r['later_rounds_utilisation']:.1%} | {load} |")


if __name__ == "__main__":
    main()
