"""Training throughput of the Pilot GPT: tokens/s, achieved FLOP/s and the fraction of peak.

What this benchmark does, per preset (d2, d4, d6 by default):
- builds the model (``pilot.model.build_model``) and its real inner optimisers (``pilot.optim``, Muon split by
  default), feeds random token batches (B × T) and times full training steps: forward + backward + optimiser
  step + zero_grad, after untimed warm-up steps (which also absorb ``torch.compile``);
- reports tokens/s and achieved FLOP/s = ``model.estimate_flops_per_token()`` × tokens/s (nanochat's
  6·N + attention count, with the attention term at the benchmarked T);
- on CPU, measures the machine's fp32 matmul peak in the same run (``torch.mm`` of big square matrices, best
  of 3, probed before the first and after every timed step) and reports three fractions, because the cores
  are often shared with other processes:
    - "% of peak": median step vs the best probe of the whole run (the conservative headline number);
    - "% of adjacent peak": each step vs the best of the probes just before and after it, median over steps
      (what the step got out of the machine as it was at that moment);
    - "% per CPU-second": FLOPs per CPU-second of this process, step vs best probe (insensitive to time-slicing,
      but blind to phases where fewer threads than cores run, so it reads high);
- on CUDA, reports MFU: the fraction of ``--peak-tflops`` (989 = H100 SXM dense bf16).

Output: one JSON object per line per config on stdout, then a markdown table (header + one row per config).

    .venv/bin/python bench/train_throughput.py                     # CPU, fp32, d2/d4/d6, vocab 8192
    .venv/bin/python bench/train_throughput.py --compile --preset d6
    .venv/bin/python bench/train_throughput.py --device cuda --preset d20 --dtype bf16 --vocab-size 65536 \\
        --batch-size 16 --seq-len 2048 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any cwd

from pilot.model import GPT, build_model, preset_config  # noqa: E402
from pilot.optim import OptimConfig, apply_lr, build_optimizers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="d2,d4,d6", help="comma-separated presets (default d2,d4,d6)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimiser step (B)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (T)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per config (the median is reported)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, where compilation happens (default 1, 2 with --compile)")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (bf16 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="CUDA peak for MFU (H100 SXM bf16 dense)")
    p.add_argument("--matmul-size", type=int, default=2048, help="CPU peak probe: n×n fp32 torch.mm")
    return p.parse_args(argv)


def matmul_peak(n: int, repeats: int = 5) -> tuple[float, float]:
    """Best fp32 FLOP/s of an n×n @ n×n torch.mm on this CPU (2n³ FLOPs per product), by wall clock and
    per CPU-second of this process (the latter does not drop when other processes share the cores)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm the BLAS (thread pool, pages)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=c)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return 2 * n**3 / best_wall, 2 * n**3 / best_cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(args: argparse.Namespace, preset: str, device: torch.device,
                 probe: Callable[[], tuple[float, float]] | None) -> dict[str, Any]:
    """Time one preset. ``probe`` (CPU only) measures the matmul peak right before and after every timed step,
    so each step is also compared with the peak the machine gave at that moment (``fraction_of_local_peak``)."""
    cfg = preset_config(preset, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    torch.manual_seed(0)
    model: GPT = build_model(cfg, device=device)
    optimizers = build_optimizers(model, replace(OptimConfig(), kind=args.optimizer))
    step_model = torch.compile(model) if args.compile else model
    dtype = DTYPES[args.dtype]
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    x, y = data[:, :-1], data[:, 1:]

    def step(i: int) -> torch.Tensor:
        apply_lr(optimizers, 1.0, i)
        with autocast:
            loss = step_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    tokens_per_step = args.batch_size * args.seq_len
    flops_per_token = model.estimate_flops_per_token()
    step_times, cpu_times, local_fractions = [], [], []
    probes = [probe()] if probe else []
    for i in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step(args.warmup + i)
        synchronize(device)
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if probe:
            probes.append(probe())
            local_peak = max(probes[-2][0], probes[-1][0])
            local_fractions.append(flops_per_token * tokens_per_step / step_times[-1] / local_peak)
    step_s = statistics.median(step_times)
    tokens_per_s = tokens_per_step / step_s
    return {
        "preset": preset, "params": sum(p.numel() for p in model.parameters()), "vocab_size": cfg.vocab_size,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "device": device.type, "dtype": args.dtype,
        "optimizer": args.optimizer, "compile": args.compile, "threads": torch.get_num_threads(),
        "steps": args.steps, "warmup_s": warmup_s, "step_s": step_s, "step_s_min": min(step_times),
        "step_s_max": max(step_times), "tokens_per_s": tokens_per_s,
        "tokens_per_s_best": tokens_per_step / min(step_times),
        "flops_per_token": flops_per_token, "achieved_flops": flops_per_token * tokens_per_s,
        "flops_per_cpu_s": flops_per_token * tokens_per_step / statistics.median(cpu_times),
        "fraction_of_local_peak": statistics.median(local_fractions) if local_fractions else None,
        "probes": probes, "load_avg_1m": os.getloadavg()[0],
        "final_loss": float(loss),
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | params | device | dtype | B×T | compile | tokens/s | GFLOP/s | peak GFLOP/s "
             "| % of peak | % of adjacent peak | % per CPU-second |", "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['device']} | {r['dtype']} | "
            f"{r['batch_size']}×{r['seq_len']} | {'yes' if r['compile'] else 'no'} | {r['tokens_per_s']:,.0f} | "
            f"{r['achieved_flops'] / 1e9:,.1f} | {r['peak_flops'] / 1e9:,.1f} | {_percent(r['fraction_of_peak'])} | "
            f"{_percent(r['fraction_of_local_peak'])} | {_percent(r.get('fraction_of_peak_cpu_time'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.warmup is None:
        args.warmup = 2 if args.compile else 1
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_cpu = device.type == "cpu"
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    probe = (lambda: matmul_peak(args.matmul_size, repeats=3)) if on_cpu else None
    rows = []
    for preset in args.preset.split(","):
        row = bench_config(args, preset.strip(), device, probe)
        print(f"{row['preset']}: {row['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
        rows.append(row)
    if on_cpu:  # the machine's peak: the best of every probe taken in this run
        probes = [p for row in rows for p in row.pop("probes")]
        peak, peak_cpu = max(p[0] for p in probes), max(p[1] for p in probes)
        peak_source = f"fp32 torch.mm {args.matmul_size}x{args.matmul_size}: best of {len(probes)} probes x 3"
        print(json.dumps({"matmul_peak_flops": peak, "matmul_peak_flops_per_cpu_s": peak_cpu,
                          "median_probe_flops": statistics.median(p[0] for p in probes), "source": peak_source,
                          "threads": torch.get_num_threads()}), flush=True)
    else:
        peak, peak_cpu, peak_source = args.peak_tflops * 1e12, None, f"--peak-tflops {args.peak_tflops}"
    for row in rows:
        row.pop("probes", None)
        row |= {"peak_flops": peak, "peak_source": peak_source, "fraction_of_peak": row["achieved_flops"] / peak}
        if peak_cpu is not None:
            row["fraction_of_peak_cpu_time"] = row["flops_per_cpu_s"] / peak_cpu
        else:
            del row["flops_per_cpu_s"]
        print(json.dumps(row), flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
