"""Per-round fixed overhead and trainer utilisation of a federated run on this machine.

Runs ``pilot run`` (real Redis, SuperLink, SuperNodes, a fresh ClientApp process
per round) with the d4 preset and 2 trainers for a few rounds at each round
length, then reads every round checkpoint's sidecar: the coordinator's round
wall time and each trainer's train / setup seconds.

- fixed overhead = round wall seconds − mean trainer train seconds (ClientApp
  start, weight load, data lease, upload, validation, aggregation, checkpoint);
- utilisation = mean train seconds / round wall seconds.

Bytes per update for each encoding come from ``bench/update_codec.py``.
Prints one JSON object per round length and a markdown table.

    .venv/bin/python bench/round_overhead.py --round-seconds 30 120 --rounds 2
"""

from __future__ import annotations

import argparse
import json
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


def measure(round_seconds: float, rounds: int, trainers: int, data: Path, work: Path) -> dict:
    cfg = run_config_from({
        "run-id": f"overhead-{int(round_seconds)}", "data": str(data), "out": str(work / f"r{int(round_seconds)}"),
        "preset": "d4", "seq-len": 128, "batch-size": 8, "rounds": rounds, "round-seconds": round_seconds,
        "min-trainers": trainers, "evaluate": False, "device": "cpu", "early-start-policy": "none",
    })
    started = time.monotonic()
    run_local(cfg, trainers, live=False)
    total = time.monotonic() - started
    rows = []
    for number, path in list_checkpoints(checkpoints_dir(cfg.run_dir())):
        if number == 0:
            continue
        extra = read_checkpoint_meta(path).extra
        reports = extra["reports"].values()
        train = statistics.mean(r["train_seconds"] for r in reports)
        setup = statistics.mean(r["setup_seconds"] for r in reports)
        rows.append({"round": number, "wall_s": extra["wall_s"], "train_s": train, "setup_s": setup})
    wall = statistics.mean(r["wall_s"] for r in rows)
    train = statistics.mean(r["train_s"] for r in rows)
    return {
        "round_seconds": round_seconds, "rounds": rounds, "trainers": trainers, "preset": "d4",
        "mean_round_wall_s": round(wall, 2), "mean_train_s": round(train, 2),
        "fixed_overhead_s": round(wall - train, 2), "utilisation": round(train / wall, 4),
        "mean_trainer_setup_s": round(statistics.mean(r["setup_s"] for r in rows), 2),
        "run_wall_s": round(total, 1), "per_round": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-seconds", type=float, nargs="+", default=[30.0, 120.0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
    args = parser.parse_args()
    configure(service="bench", level="WARNING")
    results = []
    with tempfile.TemporaryDirectory(prefix="pilot-overhead-") as tmp:
        for seconds in args.round_seconds:
            result = measure(seconds, args.rounds, args.trainers, args.data, Path(tmp))
            print(json.dumps(result), flush=True)
            results.append(result)
    print("\n| round s | rounds | trainers | mean round wall s | mean train s | fixed overhead s | utilisation |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['round_seconds']:g} | {r['rounds']} | {r['trainers']} | {r['mean_round_wall_s']} | "
              f"{r['mean_train_s']} | {r['fixed_overhead_s']} | {r['utilisation']:.1%} |")


if __name__ == "__main__":
    main()
