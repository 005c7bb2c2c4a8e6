"""Evaluation throughput of the evaluator: validation tokens/s of a BPB pass, and sampling speed.

What this benchmark does:
- writes a round checkpoint of a freshly initialised model (``--preset``, default d4) with the run's
  tokenizer (byte by default, or ``--tokenizer`` artifact) into a temporary run directory;
- imports ``--data`` (default: the shared Tiny Shakespeare) into shards once (``resolve_data``);
- builds the evaluator exactly as ``pilot evaluator`` does (``services.evaluator.evaluation.Evaluator``)
  with ``--eval-tokens`` (default 65,536, a seeded sample of the validation split) and times:
  the first full ``evaluate()`` (verify + load + tokenize the split + BPB pass + sample), then
  ``--repeats`` further BPB passes on the cached validation set (the steady state of a worker that
  scores every round), and the text sample on its own.

Output: one JSON object on stdout, then a markdown table (header + one row).

    .venv/bin/python bench/eval_throughput.py                           # CPU, d4, 65,536 tokens
    .venv/bin/python bench/eval_throughput.py --threads 1 --preset d2
    .venv/bin/python bench/eval_throughput.py --device cuda --preset d20 --tokenizer runs/x/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from any cwd

from pilot.checkpoint import (  # noqa: E402
    CheckpointMeta,
    TokenizerIdentity,
    checkpoints_dir,
    round_checkpoint_path,
    save_checkpoint,
)
from pilot.data import resolve_data  # noqa: E402
from pilot.model import build_model, preset_config  # noqa: E402
from pilot.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from services.evaluator.evaluation import EvalSettings, Evaluator  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="d4")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text file or shard directory")
    p.add_argument("--tokenizer", default="byte", help="byte, or a tokenizer artifact path")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="validation tokens (0: the whole split)")
    p.add_argument("--seq-len", type=int, default=256, help="model context = validation row length")
    p.add_argument("--batch-tokens", type=int, default=16_384, help="tokens per forward pass")
    p.add_argument("--sample-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed BPB passes after the first evaluation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p.parse_args(argv)


def write_checkpoint(run_dir: Path, preset: str, seq_len: int, tokenizer: Tokenizer) -> tuple[Path, int]:
    """A round-1 checkpoint of a fresh model (random lm_head, so the logits are not all zero)."""
    cfg = preset_config(preset, vocab_size=tokenizer.vocab_size, sequence_len=seq_len)
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    tokenizer.save(run_dir / "tokenizer")
    meta = CheckpointMeta(kind="round", round=1, model_config=cfg.to_dict(),
                          tokenizer=TokenizerIdentity(tokenizer.name, tokenizer.sha256))
    params = sum(p.numel() for p in model.parameters())
    return save_checkpoint(round_checkpoint_path(checkpoints_dir(run_dir), 1), model.state_dict(), meta), params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = load_tokenizer(args.tokenizer)
    data = resolve_data(args.data)
    settings = EvalSettings(data=data, device=args.device, dtype=args.dtype, threads=args.threads,
                            eval_tokens=args.eval_tokens, batch_tokens=args.batch_tokens,
                            sample_tokens=args.sample_tokens)
    with tempfile.TemporaryDirectory(prefix="pilot-eval-bench-") as tmp:
        checkpoint, params = write_checkpoint(Path(tmp), args.preset, args.seq_len, tokenizer)
        evaluator = Evaluator(settings)
        start = time.perf_counter()
        first = evaluator.evaluate(checkpoint)
        first_s = time.perf_counter() - start
        loaded = evaluator.load(checkpoint)
        passes = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result, val = evaluator.bpb(loaded)
            synchronize(evaluator.device)
            passes.append(time.perf_counter() - start)
        start = time.perf_counter()
        evaluator.sample(loaded)
        sample_s = time.perf_counter() - start
    pass_s = statistics.median(passes)
    return {
        "preset": args.preset, "params": params, "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name,
        "device": str(evaluator.device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "seq_len": val.seq_len, "batch_rows": val.batch_size, "eval_tokens": val.num_tokens,
        "split_tokens": val.split_tokens, "sampled": val.sampled, "bpb": result.bpb,
        "first_evaluate_s": first_s, "pass_s": pass_s, "pass_s_min": min(passes), "pass_s_max": max(passes),
        "tokens_per_s": val.num_tokens / pass_s, "tokens_per_s_best": val.num_tokens / min(passes),
        "sample_tokens": args.sample_tokens, "sample_s": sample_s,
        "sample_tokens_per_s": args.sample_tokens / sample_s if sample_s > 0 else None,
        "first_bpb_matches": abs(first.bpb - result.bpb) < 1e-9, "load_avg_1m": os.getloadavg()[0],
    }


def markdown(row: dict[str, Any]) -> str:
    header = ("| preset | params | device | threads | eval tokens (of split) | rows × T | BPB pass s | tokens/s "
              "| first evaluate() s | sample tokens/s |")
    body = (f"| {row['preset']} | {row['params'] / 1e6:.1f}M | {row['device']} | {row['threads']} | "
            f"{row['eval_tokens']:,} ({row['split_tokens']:,}) | {row['batch_rows']}×{row['seq_len']} | "
            f"{row['pass_s']:.2f} | {row['tokens_per_s']:,.0f} | {row['first_evaluate_s']:.2f} | "
            f"{row['sample_tokens_per_s'] or 0:,.1f} |")
    return "\n".join([header, "|" + "---|" * 10, body])


def main(argv: list[str] | None = None) -> None:
    row = run(parse_args(argv))
    print(json.dumps(row), flush=True)
    print(markdown(row))


if __name__ == "__main__":
    main()
