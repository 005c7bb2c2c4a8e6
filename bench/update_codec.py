"""Size and speed of a trainer's update on the wire: fp32 vs bf16 vs int8 (per-tensor and per-block scales).

What this benchmark does, for one model preset (d4 at vocab 8192 by default, i.e. the BPE tokenizer size the
CPU presets use; ``--vocab-size 265`` gives the byte tokenizer's):
- builds the model's parameter shapes and a pseudo-gradient Δ shaped like them: Gaussian noise with a different
  scale per row (10^U(−5,−2)), so per-block scales matter as they do in real updates;
- for each encoding, times ``UpdateCodec.encode`` (with an error-feedback residual, as the trainer runs it), the
  conversion into Flower records (``to_records``: ``np.save`` per array), and the receiving side
  (``from_records`` + ``decode``), median of ``--repeats`` runs;
- reports the payload bytes (sum of the arrays' ``nbytes``) and the wire bytes (every deflated Flower object of
  the ``ArrayRecord`` + ``ConfigRecord``: what Flower 1.41 pushes), the ratio of wire bytes to fp32's, and the
  relative L2 error ‖Δ − decode(encode(Δ))‖ / ‖Δ‖ of one round (error feedback carries the rest to later
  rounds).

Output: one JSON object per encoding on stdout, then a markdown table.

    .venv/bin/python bench/update_codec.py
    .venv/bin/python bench/update_codec.py --preset d20 --vocab-size 65536 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any cwd

from pilot.federated import (  # noqa: E402
    UpdateCodec,
    from_records,
    global_norm,
    numel,
    serialized_nbytes,
    to_records,
)
from pilot.model import parameter_shapes, preset_config  # noqa: E402

T = TypeVar("T")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="d4", help="model preset (default d4)")
    p.add_argument("--vocab-size", type=int, default=8192, help="8192 (BPE) by default; 265 = byte tokenizer")
    p.add_argument("--block-size", type=int, default=256, help="int8 block size for the blocked variant")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per encoding (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p.parse_args(argv)


def fake_delta(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Gaussian Δ with a per-row scale 10^U(−5,−2): realistic spread for absmax quantisation."""
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for name, shape in shapes.items():
        rows = shape[0] if len(shape) > 1 else 1
        scale = 10.0 ** torch.empty(rows, 1).uniform_(-5.0, -2.0, generator=gen)
        delta[name] = (torch.randn(shape, generator=gen).reshape(rows, -1) * scale).reshape(shape)
    return delta


def timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """The last result of ``fn`` and its median wall time over ``repeats`` runs."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return result, statistics.median(times)


def measure(codec: UpdateCodec, delta: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    residual = {name: torch.zeros_like(t) for name, t in delta.items()} if codec.lossy else None
    (encoded, _), encode_s = timed(lambda: codec.encode(delta, residual), repeats)
    (arrays, meta), records_s = timed(lambda: to_records(encoded), repeats)
    decoded, receive_s = timed(lambda: codec.decode(from_records(arrays, meta)), repeats)
    error = global_norm({n: delta[n] - decoded[n] for n in delta}) / global_norm(delta)
    return {
        "encoding": codec.kind,
        "block_size": codec.block_size,
        "payload_bytes": encoded.num_bytes,
        "wire_bytes": serialized_nbytes(arrays) + serialized_nbytes(meta),
        "encode_s": round(encode_s, 4),
        "to_records_s": round(records_s, 4),
        "from_records_decode_s": round(receive_s, 4),
        "rel_l2_error": float(f"{error:.3g}"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset, args.vocab_size)
    shapes = parameter_shapes(cfg)
    delta = fake_delta(shapes, args.seed)
    codecs = [UpdateCodec("fp32"), UpdateCodec("bf16"), UpdateCodec("int8", None),
              UpdateCodec("int8", args.block_size)]
    rows = []
    for codec in codecs:
        row = {"preset": args.preset, "vocab_size": args.vocab_size, "params": numel(delta),
               "tensors": len(delta), **measure(codec, delta, args.repeats)}
        rows.append(row)
    fp32_wire = rows[0]["wire_bytes"]
    for row in rows:
        row["ratio_vs_fp32"] = round(row["wire_bytes"] / fp32_wire, 4)
        print(json.dumps(row), flush=True)
    print()
    print("| encoding | params | payload bytes | wire bytes | × fp32 | encode s | to records s | "
          "from records + decode s | rel. L2 error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        label = row["encoding"] if row["encoding"] != "int8" else (
            f"int8 block {row['block_size']}" if row["block_size"] else "int8 per-tensor")
        print(f"| {label} | {row['params']:,} | {row['payload_bytes']:,} | {row['wire_bytes']:,} | "
              f"{row['ratio_vs_fp32']:.3f} | {row['encode_s']:.3f} | {row['to_records_s']:.3f} | "
              f"{row['from_records_decode_s']:.3f} | {row['rel_l2_error']:.2e} |")


if __name__ == "__main__":
    main()
