"""The evaluator against a real Redis and a real Celery worker process (`pilot evaluator`).

Tiny round checkpoints (d1, byte tokenizer in <run_dir>/tokenizer) are scored on a
validation split imported from Tiny Shakespeare. In-process tests check the
evaluation function (the same one `pilot eval` and the worker use) and its
refusals; the worker tests enqueue jobs with no worker running, start
`pilot evaluator` as a subprocess, and check the backlog order, idempotency,
failure recording, transient retries, the gRPC service and the offline wandb run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import torch
from celery import Celery
from celery.result import AsyncResult
from typer.testing import CliRunner

from pilot.bus import Bus
from pilot.checkpoint import CheckpointMeta, TokenizerIdentity, checkpoints_dir, round_checkpoint_path, save_checkpoint
from pilot.cli import app as cli
from pilot.data import import_text
from pilot.errors import CheckpointError, TokenizerError
from pilot.grpc_util import make_channel
from pilot.hashing import sha256_file
from pilot.jobs import BadJob, evaluation_task_id, make_celery
from pilot.keys import Stream
from pilot.model import build_model, preset_config
from pilot.redis_server import free_port
from pilot.tokenizer import ByteTokenizer
from pilot.v1 import events_pb2 as ev
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc
from pilot.v1.jobs_pb2 import EvaluateCheckpointJob
from services.evaluator.evaluation import EvalSettings, Evaluator
from services.evaluator.queue import EVALUATE_TASK, check_job, enqueue_evaluation
from services.evaluator.results import ResultStore
from services.evaluator.worker import TRANSIENT_ERRORS, EvalWorker, WorkerConfig, create_app
from services.evaluator.tracking import WandbSettings

EVAL_TOKENS = 2048
SAMPLE_TOKENS = 16
SEQ_LEN = 64
WORKER_START_S = 120.0
runner = CliRunner()


# --------------------------------------------------------------------------- fixtures


@dataclass
class Files:
    data: Path  # validation data (shard dir)
    run_dir: Path
    checkpoints: dict[int, Path]

    def job(self, run_id: str, round: int, **overrides: Any) -> EvaluateCheckpointJob:
        path = self.checkpoints[round]
        fields = {"run_id": run_id, "round": round, "uri": str(path), "sha256": sha256_file(path / "checkpoint.json"),
                  "tokens": 1000 * round}
        return EvaluateCheckpointJob(**{**fields, **overrides})


def write_checkpoint(run_dir: Path, round: int, tokenizer: ByteTokenizer) -> Path:
    """A d1 round checkpoint with seeded random weights (each round scores differently)."""
    cfg = preset_config("d1", vocab_size=tokenizer.vocab_size, sequence_len=SEQ_LEN)
    torch.manual_seed(round)
    model = build_model(cfg)
    torch.nn.init.normal_(model.lm_head.weight, std=0.05 * round)
    meta = CheckpointMeta(kind="round", round=round, tokens_seen=1000 * round, model_config=cfg.to_dict(),
                          tokenizer=TokenizerIdentity(tokenizer.name, tokenizer.sha256))
    return save_checkpoint(round_checkpoint_path(checkpoints_dir(run_dir), round), model.state_dict(), meta)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on a small shared CPU, spin-waiting threads make tiny models 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, shakespeare_path: Path) -> Files:
    root = tmp_path_factory.mktemp("evaluator")
    text = root / "shakespeare-slice.txt"
    text.write_text(shakespeare_path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    import_text([text], root / "data", val_fraction=0.25)
    tokenizer = ByteTokenizer()
    run_dir = root / "run"
    tokenizer.save(run_dir / "tokenizer")
    checkpoints = {r: write_checkpoint(run_dir, r, tokenizer) for r in range(0, 6)}  # 0: zero lm_head
    model_file = checkpoints[4] / "model.safetensors"  # round 4: a tensor file tampered after writing
    raw = bytearray(model_file.read_bytes())
    raw[-8:] = bytes(8)
    model_file.write_bytes(bytes(raw))
    return Files(root / "data", run_dir, checkpoints)


def settings(files: Files, **overrides: Any) -> EvalSettings:
    values = {"data": files.data, "eval_tokens": EVAL_TOKENS, "sample_tokens": SAMPLE_TOKENS, "threads": 1}
    return EvalSettings(**{**values, **overrides})


def pilot_eval(files: Files, round: int) -> dict[str, Any]:
    """`pilot eval --json` on a checkpoint, with the settings the worker under test uses."""
    result = runner.invoke(cli, ["eval", "--checkpoint", str(files.checkpoints[round]), "--threads", "1",
                                 "--data", str(files.data), "--eval-tokens", str(EVAL_TOKENS),
                                 "--sample-tokens", str(SAMPLE_TOKENS), "--json"])
    assert result.exit_code == 0, result.output
    printed: dict[str, Any] = json.loads(result.stdout)
    return printed


# ------------------------------------------------------------------ in-process checks


def test_pilot_eval_and_sample_reproduce_the_evaluation_function(files: Files, one_thread: None) -> None:
    outcome = Evaluator(settings(files)).evaluate(files.checkpoints[1])
    assert outcome.sampled and outcome.tokens == EVAL_TOKENS and outcome.split_tokens > EVAL_TOKENS
    assert outcome.round == 1 and outcome.tokens_seen == 1000 and outcome.seq_len == SEQ_LEN
    assert 1.0 < outcome.bpb < 20.0 and outcome.sample

    printed = pilot_eval(files, 1)
    assert abs(printed["bpb"] - outcome.bpb) < 1e-6
    assert (printed["tokens"], printed["sampled"], printed["sample"]) == (outcome.tokens, True, outcome.sample)

    whole = Evaluator(settings(files, eval_tokens=0)).evaluate(files.checkpoints[1])
    assert not whole.sampled and whole.tokens == whole.split_tokens == outcome.split_tokens

    sampled = runner.invoke(cli, ["sample", "--checkpoint", str(files.checkpoints[1]), "--threads", "1",
                                  "--tokens", str(SAMPLE_TOKENS)])
    assert sampled.exit_code == 0, sampled.output
    assert sampled.stdout == f"The {outcome.sample}\n"  # same prompt, temperature, top-k and seed


def test_refusals_name_the_problem(files: Files, tmp_path: Path, one_thread: None) -> None:
    evaluator = Evaluator(settings(files))
    with pytest.raises(CheckpointError, match="sha256 mismatch: checkpoint.json has .* the job expects 0+"):
        evaluator.load(files.checkpoints[1], expected_sha256="0" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors \(group 'model'\) sha256 mismatch"):
        evaluator.load(files.checkpoints[4])
    with pytest.raises(CheckpointError, match="is of round 2, the job is for round 3"):
        evaluator.load(files.checkpoints[2], expected_round=3)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        evaluator.load(tmp_path / "nope")
    small = preset_config("d1", vocab_size=100, sequence_len=SEQ_LEN)  # fewer ids than the tokenizer has
    ByteTokenizer().save(tmp_path / "run" / "tokenizer")
    meta = CheckpointMeta(kind="round", round=1, model_config=small.to_dict())
    bad = save_checkpoint(tmp_path / "run" / "checkpoints" / "round_00001", build_model(small).state_dict(), meta)
    with pytest.raises(CheckpointError, match="has vocab_size 100, smaller than its tokenizer byte's 265"):
        evaluator.load(bad)
    unknown = CheckpointMeta(kind="round", round=2, model_config={**small.to_dict(), "n_experts": 8})
    odd = save_checkpoint(tmp_path / "run" / "checkpoints" / "round_00002", build_model(small).state_dict(), unknown)
    with pytest.raises(CheckpointError, match="has an invalid model config: .*n_experts"):
        evaluator.load(odd)
    other = ByteTokenizer(specials=("<|bos|>", "<|other|>"))
    other.save(tmp_path / "other-tokenizer")
    wrong = Evaluator(settings(files, tokenizer=tmp_path / "other-tokenizer"))
    with pytest.raises(TokenizerError, match="is not the one checkpoint .* was trained with"):
        wrong.load(files.checkpoints[1])

    result = runner.invoke(cli, ["evaluator", "--redis", "redis://:x@127.0.0.1:1/0", "--data", str(tmp_path / "gone")])
    assert result.exit_code == 2 and f"data path {tmp_path / 'gone'} does not exist" in result.stderr


def test_jobs_are_checked_and_the_task_retries_only_transient_errors(redis_url: str) -> None:
    with pytest.raises(BadJob, match="round 3: no checkpoint uri"):
        check_job(EvaluateCheckpointJob(run_id="r1", round=3))
    assert check_job(EvaluateCheckpointJob(run_id="r1", round=0, uri="/x")).round == 0  # the initial weights
    with pytest.raises(BadJob, match="invalid run id"):
        check_job(EvaluateCheckpointJob(run_id="bad id", round=1, uri="/x"))
    task = create_app(redis_url, max_retries=3).tasks[EVALUATE_TASK]
    assert task.max_retries == 3 and task.retry_backoff and task.retry_jitter
    assert set(task.autoretry_for) == set(TRANSIENT_ERRORS)
    assert not any(issubclass(CheckpointError, t) or issubclass(TokenizerError, t) for t in TRANSIENT_ERRORS)


def test_a_missing_validation_file_is_retried_then_recorded(
    files: Files, tmp_path: Path, redis_url: str, run_id: str, one_thread: None
) -> None:
    """In-process: the worker's handler re-raises a transient error until the last attempt, then records it."""
    data = tmp_path / "data"
    import shutil

    shutil.copytree(files.data, data)
    worker = EvalWorker(WorkerConfig(redis_url=redis_url, eval=settings(files, data=data),
                                     wandb=WandbSettings(enabled=False)))
    val_shard = worker.evaluator.val_shard
    assert val_shard is not None
    hidden = val_shard.rename(val_shard.with_suffix(".away"))
    job = files.job(run_id, 1)
    with pytest.raises(FileNotFoundError):
        worker.handle(job, attempt=0, max_retries=2)
    failed = worker.handle(job, attempt=2, max_retries=2)
    assert failed.status == "failed" and failed.reason.startswith("gave up after 3 attempts: FileNotFoundError")
    hidden.rename(val_shard)
    ok = worker.handle(job, attempt=0, max_retries=2)
    store = worker.store(run_id)
    assert ok.ok and store.get(1) == ok and store.get_failed(1) is None  # success clears the failure
    worker.close()


# ------------------------------------------------------------------- the worker process


class WorkerProcess:
    """`pilot evaluator` in a subprocess, logging to a file."""

    def __init__(self, redis_url: str, files: Files, queue: str, log_path: Path, *extra: str) -> None:
        self.grpc_port = free_port()
        self.wandb_dir = log_path.parent / "wandb"
        command = [
            sys.executable, "-m", "pilot.cli", "evaluator", "--redis", redis_url, "--data", str(files.data),
            "--queue", queue, "--threads", "1", "--eval-tokens", str(EVAL_TOKENS), "--sample-tokens",
            str(SAMPLE_TOKENS), "--grpc-port", str(self.grpc_port), "--grpc-host", "127.0.0.1", "--max-retries", "3",
            "--wandb-dir", str(self.wandb_dir), *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def wait_for(what: str, check: Callable[[], bool], worker: WorkerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        assert worker.proc.poll() is None, f"worker exited ({worker.proc.returncode}):\n{worker.log_tail()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{worker.log_tail()}")


def eval_events(bus: Bus) -> list[ev.EvalCompleted]:
    return [e.event for e in bus.replay(Stream.CONTROL) if isinstance(e.event, ev.EvalCompleted)]


@dataclass
class Backlog:
    """A worker that was started after four jobs of ``run_id`` were already waiting on ``queue``."""

    worker: WorkerProcess
    celery: Celery
    queue: str
    client: redis.Redis
    run_id: str

    def enqueue(self, files: Files, run_id: str, round: int, **overrides: Any) -> None:
        enqueue_evaluation(self.celery, files.job(run_id, round, **overrides), queue=self.queue)

    def wait_results(self, run_id: str, count: int) -> list[Any]:
        store = ResultStore(self.client, run_id)
        wait_for(f"{count} results of {run_id}", lambda: len(store.all()) >= count, self.worker, 60)
        return store.all()


@pytest.fixture(scope="module")
def backlog(redis_url: str, files: Files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backlog]:
    queue = f"test.eval.{uuid.uuid4().hex[:8]}"
    run_id = f"backlog-{uuid.uuid4().hex[:8]}"
    celery = make_celery("test-coordinator", redis_url)
    for round in (0, 1, 2, 3):  # the worker is down: the jobs wait in the queue
        enqueue_evaluation(celery, files.job(run_id, round), queue=queue)
    client = redis.Redis.from_url(redis_url)
    worker = WorkerProcess(redis_url, files, queue, tmp_path_factory.mktemp("worker") / "worker.log")
    handle = Backlog(worker, celery, queue, client, run_id)
    try:
        handle.wait_results(run_id, 4)
        yield handle
    finally:
        worker.stop()
        celery.close()
        client.close()


def test_backlog_is_worked_through_in_round_order(backlog: Backlog, files: Files, one_thread: None) -> None:
    results = ResultStore(backlog.client, backlog.run_id).all()
    assert [(r.round, r.status) for r in results] == [(0, "ok"), (1, "ok"), (2, "ok"), (3, "ok")]
    events = eval_events(Bus(backlog.client, backlog.run_id))
    assert [e.round for e in events] == [0, 1, 2, 3]  # FIFO queue: the rounds in the order they closed
    assert all(e.status == ev.EVAL_STATUS_OK for e in events)
    assert abs(results[0].bpb - math.log2(ByteTokenizer().vocab_size)) < 1e-5  # zero logits: uniform over 265

    expected = pilot_eval(files, 1)
    first = results[1]
    assert abs(first.bpb - expected["bpb"]) < 1e-6 and abs(events[1].bpb - expected["bpb"]) < 1e-6
    assert (first.tokens, first.sampled, first.split_tokens) == (EVAL_TOKENS, True, expected["split_tokens"])
    assert first.sample == expected["sample"] and first.checkpoint_tokens == 1000
    sidecar_sha256 = sha256_file(files.checkpoints[1] / "checkpoint.json")
    assert first.checkpoint_sha256 == sidecar_sha256 == events[1].checkpoint_sha256
    assert len({r.bpb for r in results}) == 4


def test_duplicates_give_one_result_and_failures_do_not_stop_the_worker(
    backlog: Backlog, files: Files, run_id: str
) -> None:
    for round in (1, 1, 4, 2):  # round 1 twice; round 4's tensor file was tampered with
        backlog.enqueue(files, run_id, round)
    results = backlog.wait_results(run_id, 3)
    assert [(r.round, r.status) for r in results] == [(1, "ok"), (2, "ok"), (4, "failed")]
    failed = results[2]
    assert "model.safetensors" in failed.reason and "sha256 mismatch" in failed.reason
    events = eval_events(Bus(backlog.client, run_id))
    assert [(e.round, e.status) for e in events] == [
        (1, ev.EVAL_STATUS_OK), (4, ev.EVAL_STATUS_FAILED), (2, ev.EVAL_STATUS_OK)
    ]  # one EvalCompleted for the duplicated round
    assert events[1].failed_reason == failed.reason

    backlog.enqueue(files, run_id, 3, sha256="f" * 64)  # the checkpoint is not the one the job names
    backlog.enqueue(files, run_id, 5)
    results = backlog.wait_results(run_id, 5)
    assert [(r.round, r.status) for r in results] == [(1, "ok"), (2, "ok"), (3, "failed"), (4, "failed"), (5, "ok")]
    assert "sha256 mismatch" in results[2].reason and results[2].attempts == 1  # permanent: not retried


def test_grpc_results_and_idempotent_evaluate(backlog: Backlog, files: Files) -> None:
    with make_channel(f"127.0.0.1:{backlog.worker.grpc_port}") as channel:
        stub = svc_grpc.EvaluatorStub(channel)
        reply = stub.GetResults(svc.GetResultsRequest(run_id=backlog.run_id), timeout=10, wait_for_ready=True)
        assert [(r.round, r.status) for r in reply.results] == [(r, ev.EVAL_STATUS_OK) for r in (0, 1, 2, 3)]
        later = stub.GetResults(svc.GetResultsRequest(run_id=backlog.run_id, from_round=2), timeout=10)
        assert [r.round for r in later.results] == [2, 3]

        done = stub.Evaluate(svc.EvaluateRequest(job=files.job(backlog.run_id, 1)), timeout=10)
        assert done.accepted and done.already_done and done.job_id == f"eval:{backlog.run_id}:1"
        queued = stub.Evaluate(svc.EvaluateRequest(job=files.job(backlog.run_id, 5)), timeout=10)
        assert queued.accepted and not queued.already_done
        with pytest.raises(grpc.RpcError) as refused:
            stub.Evaluate(svc.EvaluateRequest(job=EvaluateCheckpointJob(run_id=backlog.run_id, round=7)), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    results = backlog.wait_results(backlog.run_id, 5)
    assert [r.round for r in results] == [0, 1, 2, 3, 5]


def test_a_transient_error_is_retried_with_backoff(backlog: Backlog, files: Files, run_id: str) -> None:
    val_shard = sorted(files.data.glob("shard_*.parquet"))[-1]
    away = val_shard.rename(val_shard.with_suffix(".away"))  # e.g. a network file system remounting
    try:
        backlog.enqueue(files, run_id, 2)
        task = AsyncResult(evaluation_task_id(run_id, 2), app=backlog.celery)
        wait_for("a retry", lambda: task.state == "RETRY", backlog.worker, 30)
    finally:
        away.rename(val_shard)
    (result,) = backlog.wait_results(run_id, 1)
    assert result.ok and result.attempts >= 2


def test_wandb_writes_an_offline_run(backlog: Backlog) -> None:
    runs = list((backlog.worker.wandb_dir / "wandb").glob(f"offline-run-*-{backlog.run_id}-eval"))
    assert len(runs) == 1, backlog.worker.log_tail()
    assert list(runs[0].glob("*.wandb"))
