"""BPE training speed and memory: pilot_rustbpe vs PyPI rustbpe 0.1.0 vs HF tokenizers.

What this benchmark does:
- builds one corpus of at least ``--min-mb`` MB (default 21): the shared data's text files
  (``<repo>/../shared/data``, cut into paragraph documents at blank lines) plus Python's standard
  library ``*.py`` sources (one document per file, sorted by path, until the size is reached);
- for each vocab size (default 4096 and 32768) trains every contender on the same documents, each
  run in its own subprocess (fresh interpreter, so peak memory is the child's own ``VmHWM``):
  ``pilot_rustbpe`` (``Trainer.feed`` on a list of str), ``rustbpe`` (``train_from_iterator``),
  ``hf_tokenizers`` (``BpeTrainer`` with the same regex split + byte-level pre-tokenizer), and
  ``pilot_rustbpe_arrow`` (reads the corpus as a parquet file, Arrow buffers straight to Rust; its
  time includes reading the parquet);
- reports training wall seconds and CPU seconds (medians of ``--repeat`` runs, taken round-robin
  so a busy machine slows every trainer alike), peak RSS of the process during training (the peak
  is reset after the corpus is loaded and every library imported, so baselines match) and its
  growth over the RSS before training, whether the merges are identical to rustbpe's, and encode throughput of the
  result through ``tiktoken`` (``encode_ordinary_batch``, 2 threads, on the first 4 MB of documents).

Output: one JSON object per line per (vocab, trainer) on stdout, then a markdown table.

    .venv/bin/python bench/tokenizer.py                    # vocab 4096 and 32768, 3 repeats
    .venv/bin/python bench/tokenizer.py --vocab 4096 --repeat 5
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("pilot_rustbpe", "rustbpe", "hf_tokenizers", "pilot_rustbpe_arrow")
DOC_SEP = "\x00"
EVAL_BYTES = 4 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data directory")
    p.add_argument("--min-mb", type=float, default=21.0, help="corpus size in MB (10^6 bytes)")
    p.add_argument("--vocab", default="4096,32768", help="comma-separated vocab sizes")
    p.add_argument("--repeat", type=int, default=3, help="runs per (vocab, trainer); the median time is reported")
    p.add_argument(
        "--trainers", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS)
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- corpus -----------------------------------------------------------------------


def build_corpus(data: Path, min_bytes: int) -> list[str]:
    """Shared-data paragraphs, then stdlib sources, until ``min_bytes`` UTF-8 bytes."""
    docs: list[str] = []
    for path in sorted(data.rglob("*.txt")):
        docs += [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    size = sum(len(d.encode("utf-8")) for d in docs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if size >= min_bytes:
            break
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode("utf-8"))
    if size < min_bytes:
        raise SystemExit(f"corpus has only {size / 1e6:.1f} MB, fewer than --min-mb {min_bytes / 1e6:.1f}")
    return [d.replace(DOC_SEP, "") for d in docs]


def write_corpus(docs: list[str], directory: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = directory / "corpus.txt"
    path.write_text(DOC_SEP.join(docs), encoding="utf-8")
    pq.write_table(pa.table({"text": docs}), directory / "corpus.parquet", row_group_size=4096)
    return path


def load_docs(corpus: Path) -> list[str]:
    return corpus.read_text(encoding="utf-8").split(DOC_SEP)


# --- trainers (run inside the worker subprocess) ------------------------------------------


def train_pilot(docs: list[str], vocab: int, corpus: Path) -> dict[bytes, int]:
    import pilot_rustbpe

    trainer = pilot_rustbpe.Trainer()
    trainer.feed(docs)
    return dict(trainer.train(vocab))


def train_pilot_arrow(_docs: list[str], vocab: int, corpus: Path) -> dict[bytes, int]:
    import pilot_rustbpe

    from pilot.bpe import TextSource, feed_parquet

    trainer = pilot_rustbpe.Trainer()
    feed_parquet(trainer, TextSource(corpus.with_suffix(".parquet")))
    return dict(trainer.train(vocab))


def train_rustbpe(docs: list[str], vocab: int, corpus: Path) -> dict[bytes, int]:
    import pilot_rustbpe

    import rustbpe

    tok = rustbpe.Tokenizer()  # type: ignore[attr-defined]  # (no stub)
    tok.train_from_iterator(iter(docs), vocab, pattern=pilot_rustbpe.GPT4_PATTERN)
    return {bytes(b): r for b, r in tok.get_mergeable_ranks()}


def train_hf(docs: list[str], vocab: int, corpus: Path) -> dict[bytes, int]:
    import pilot_rustbpe
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(pilot_rustbpe.GPT4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab, min_frequency=0, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    return hf_to_ranks(tok.get_vocab())


def hf_to_ranks(vocab: dict[str, int]) -> dict[bytes, int]:
    """HF byte-level token strings → bytes (GPT-2's bytes_to_unicode, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    decoder = {chr(c): b for b, c in zip(printable, chars, strict=True)}
    return {bytes(decoder[ch] for ch in token): rank for token, rank in vocab.items()}


TRAINERS: dict[str, Callable[[list[str], int, Path], dict[bytes, int]]] = {
    "pilot_rustbpe": train_pilot,
    "rustbpe": train_rustbpe,
    "hf_tokenizers": train_hf,
    "pilot_rustbpe_arrow": train_pilot_arrow,
}


def memory_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(name: str, corpus: Path, vocab: int, result: Path) -> None:
    # Every worker imports the same modules first, so baselines are equal.
    import pilot_rustbpe  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import tiktoken  # noqa: F401
    import tokenizers  # noqa: F401

    import pilot.bpe  # noqa: F401
    import rustbpe  # noqa: F401

    logging.getLogger("rustbpe").setLevel(logging.WARNING)  # no per-1% INFO lines through Python logging
    streamed = name.endswith("_arrow")
    docs = [] if streamed else load_docs(corpus)
    reset_peak_rss()
    rss_before, _ = memory_mib()
    cpu_before, started = cpu_seconds(), time.perf_counter()
    ranks = TRAINERS[name](docs, vocab, corpus)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    _, peak = memory_mib()
    encode_mb_s = encode_speed(ranks, docs or load_docs(corpus))
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    result.write_text(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "rss_before_mib": rss_before,
                "peak_rss_mib": peak,
                "encode_mb_s": encode_mb_s,
                "ranks": [base64.b64encode(b).decode("ascii") for b, _ in by_rank],
            }
        )
    )


def encode_speed(ranks: dict[bytes, int], docs: list[str]) -> float | None:
    import pilot_rustbpe
    import tiktoken

    if sorted(ranks.values()) != list(range(len(ranks))):
        return None
    enc = tiktoken.Encoding("bench", pat_str=pilot_rustbpe.GPT4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    sample: list[str] = []
    size = 0
    for doc in docs:
        if size >= EVAL_BYTES:
            break
        sample.append(doc)
        size += len(doc.encode("utf-8"))
    enc.encode_ordinary_batch(sample[:50], num_threads=2)  # warm-up
    started = time.perf_counter()
    enc.encode_ordinary_batch(sample, num_threads=2)
    return size / 1e6 / (time.perf_counter() - started)


# --- driver -----------------------------------------------------------------------


def run_one(name: str, corpus: Path, vocab: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = Path(handle.name)
    try:
        cmd = [sys.executable, __file__, "--worker", name, "--corpus", str(corpus), "--vocab", str(vocab)]
        subprocess.run([*cmd, "--result", str(result)], check=True, cwd=REPO)
        out: dict[str, Any] = json.loads(result.read_text())
        return out
    finally:
        result.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.corpus, int(args.vocab), args.result)
        return
    trainers = [t for t in args.trainers.split(",") if t]
    unknown = sorted(set(trainers) - set(TRAINERS))
    if unknown:
        raise SystemExit(f"unknown trainers {unknown}; choose from {', '.join(CONTENDERS)}")
    docs = build_corpus(args.data, int(args.min_mb * 1e6))
    corpus_bytes = sum(len(d.encode("utf-8")) for d in docs)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp:
        corpus = write_corpus(docs, Path(tmp))
        del docs
        for vocab in (int(v) for v in args.vocab.split(",")):
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trainers}
            for _ in range(args.repeat):  # round-robin, so load changes hit every trainer alike
                for name in trainers:
                    runs[name].append(run_one(name, corpus, vocab))
            reference = runs["rustbpe"][0]["ranks"] if "rustbpe" in runs else None
            for name, results in runs.items():
                row = {
                    "vocab": vocab,
                    "trainer": name,
                    "corpus_mb": round(corpus_bytes / 1e6, 2),
                    "seconds": round(statistics.median(r["seconds"] for r in results), 3),
                    "seconds_all": [round(r["seconds"], 3) for r in results],
                    "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in results), 3),
                    "peak_rss_mib": round(max(r["peak_rss_mib"] for r in results), 1),
                    "train_rss_growth_mib": round(max(r["peak_rss_mib"] - r["rss_before_mib"] for r in results), 1),
                    "identical_merges": None if reference is None else results[0]["ranks"] == reference,
                    "encode_mb_s": None if results[0]["encode_mb_s"] is None else round(results[0]["encode_mb_s"], 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    base = {r["vocab"]: r for r in rows if r["trainer"] == "rustbpe"}
    print()
    print(
        "| corpus | vocab | trainer | seconds (median) | CPU seconds | speed-up vs rustbpe (wall / CPU) "
        "| peak RSS (MiB) | RSS growth in training (MiB) | merges = rustbpe | encode MB/s (tiktoken) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = base.get(r["vocab"])
        speedup = f"{ref['seconds'] / r['seconds']:.2f}x / {ref['cpu_seconds'] / r['cpu_seconds']:.2f}x" if ref else "-"
        same = {True: "yes", False: "no", None: "-"}[r["identical_merges"]]
        print(
            f"| {r['corpus_mb']} MB | {r['vocab']} | {r['trainer']} | {r['seconds']:.3f} | {r['cpu_seconds']:.2f} "
            f"| {speedup} | {r['peak_rss_mib']:.0f} | {r['train_rss_growth_mib']:.0f} | {same} | {r['encode_mb_s']} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # `pilot` importable when run as a script from any cwd
    main()
