"""The tokenizer service end to end: gRPC serving and fetching, and training as a Celery job.

A BPE tokenizer (vocab 400) is trained in-process on ~200 KB of Tiny Shakespeare
and served by `pilot tokenizer serve` in a subprocess on loopback: the tests
fetch it with ``fetch_tokenizer`` (full copy, then ``not_modified``), encode and
decode over gRPC against the local tokenizer, check the request limits
(INVALID_ARGUMENT from the service, RESOURCE_EXHAUSTED from gRPC) and that the
server answers afterwards, and stop it with SIGTERM. A tampering server started
in-process checks that the client refuses what does not verify. The training
job runs on a real `pilot tokenizer worker` process against the real embedded
Redis, submitted by `pilot tokenizer submit --wait` and by ``enqueue_training``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
import redis

from pilot.bpe import BPETokenizer, train_bpe
from pilot.errors import TokenizerError
from pilot.grpc_util import check_health, make_channel
from pilot.hashing import sha256_bytes, sha256_file
from pilot.jobs import encode_job, make_celery
from pilot.tokenizer import ARTIFACT_FILE, load_tokenizer
from pilot.tokenizer_client import fetch_tokenizer
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc
from pilot.v1.jobs_pb2 import TrainTokenizerJob
from services.tokenizer.grpc_server import (
    MAX_IDS,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    ServedArtifact,
    TokenizerService,
    serve_tokenizer,
)
from services.tokenizer.queue import TRAIN_TASK, enqueue_training, tokenizer_job_id
from services.tokenizer.status import JobStatusStore, ProgressPublisher
from services.tokenizer.worker import TokenizerWorker, WorkerConfig

CORPUS_BYTES = 200_000
VOCAB = 400
START_S = 60.0
JOB_S = 60.0


@dataclass(frozen=True)
class Files:
    root: Path
    corpus: Path
    artifact: Path
    tokenizer: BPETokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, shakespeare_path: Path) -> Files:
    root = tmp_path_factory.mktemp("tokenizer-service")
    head = shakespeare_path.read_bytes()[:CORPUS_BYTES]
    corpus = root / "corpus.txt"
    corpus.write_bytes(head[: head.rindex(b"\n") + 1])
    tokenizer = train_bpe(corpus, VOCAB, progress=False, threads=1)
    artifact = root / "artifact"
    tokenizer.save(artifact)
    return Files(root, corpus, artifact, tokenizer)


class CliProcess:
    """A `pilot tokenizer ...` subprocess; stderr (the logs) goes to a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pilot.cli", "tokenizer", *args], stdout=subprocess.PIPE, stderr=self._log,
            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, text=True,
        )

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@dataclass
class Server:
    cli: CliProcess
    address: str


@pytest.fixture(scope="module")
def server(files: Files) -> Iterator[Server]:
    """`pilot tokenizer serve` on a free loopback port (read from its first stdout line)."""
    cli = CliProcess(["serve", "--artifact", str(files.artifact), "--host", "127.0.0.1", "--port", "0"],
                     files.root / "serve.log")
    try:
        assert cli.proc.stdout is not None
        line = cli.proc.stdout.readline()  # blocks until the server is bound (or the process died)
        assert "serving tokenizer" in line, f"serve did not start: {line!r}\n{cli.log_tail()}"
        yield Server(cli, f"127.0.0.1:{int(line.rsplit(':', 1)[1])}")
    finally:
        cli.stop()


def rpc_error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    return info.value


# ------------------------------------------------------------------------- gRPC


def test_get_tokenizer_and_fetch_give_the_same_tokenizer(server: Server, files: Files, tmp_path: Path) -> None:
    data = (files.artifact / ARTIFACT_FILE).read_bytes()
    with make_channel(server.address) as channel:
        assert check_health(channel) == "SERVING"
        assert check_health(channel, "pilot.v1.Tokenizer") == "SERVING"
        stub = svc_grpc.TokenizerStub(channel)
        reply = stub.GetTokenizer(svc.GetTokenizerRequest(), timeout=30)
        assert (reply.artifact, reply.sha256, reply.vocab_size, reply.name) == (
            data, sha256_bytes(data), VOCAB, f"bpe{VOCAB}")
        same = stub.GetTokenizer(svc.GetTokenizerRequest(name=reply.name, if_none_match=reply.sha256), timeout=30)
        assert same.not_modified and same.artifact == b"" and same.sha256 == reply.sha256
        stale = stub.GetTokenizer(svc.GetTokenizerRequest(if_none_match="0" * 64), timeout=30)
        assert not stale.not_modified and stale.artifact == data
        missing = rpc_error(stub.GetTokenizer, svc.GetTokenizerRequest(name="bpe65536"))
        assert missing.code() == grpc.StatusCode.NOT_FOUND and "bpe65536" in (missing.details() or "")

    cache = tmp_path / "cache"
    directory = fetch_tokenizer(server.address, cache_dir=cache)
    assert directory == cache / reply.sha256 and (directory / ARTIFACT_FILE).read_bytes() == data
    fetched = load_tokenizer(directory, expected_sha256=files.tokenizer.sha256)
    assert isinstance(fetched, BPETokenizer) and fetched.mergeable_ranks == files.tokenizer.mergeable_ranks
    inode = (directory / ARTIFACT_FILE).stat().st_ino
    assert fetch_tokenizer(server.address, cache_dir=cache) == directory  # not_modified: the file is kept as is
    assert (directory / ARTIFACT_FILE).stat().st_ino == inode
    # Pinned and cached: no call at all (this address has no server).
    assert fetch_tokenizer("127.0.0.1:1", sha256=reply.sha256, cache_dir=cache) == directory
    with pytest.raises(TokenizerError, match="expected"):
        fetch_tokenizer(server.address, sha256="f" * 64, cache_dir=tmp_path / "other")
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".current-")) == [reply.sha256]


def test_encode_and_decode_match_the_local_tokenizer(server: Server, files: Files) -> None:
    text = files.corpus.read_text()
    texts = [text[:5000], "", "héllo wörld 🎉 — naïve", "<|bos|> is plain text here", text[-777:]]
    local = files.tokenizer
    with make_channel(server.address) as channel:
        stub = svc_grpc.TokenizerStub(channel)
        encoded = stub.Encode(svc.EncodeRequest(texts=texts), timeout=30)
        assert [list(t.ids) for t in encoded.ids] == local.encode_batch(texts)
        with_bos = stub.Encode(svc.EncodeRequest(texts=texts[:1], prepend_bos=True), timeout=30)
        assert list(with_bos.ids[0].ids) == [local.bos_id, *local.encode(texts[0])]
        decoded = stub.Decode(svc.DecodeRequest(ids=encoded.ids), timeout=30)
        assert list(decoded.texts) == texts
        out_of_range = [svc.TokenIds(ids=[1, 2]), svc.TokenIds(ids=[5, VOCAB + 7])]
        bad = rpc_error(stub.Decode, svc.DecodeRequest(ids=out_of_range))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"token id {VOCAB + 7}" in (bad.details() or "") and "sequence 1" in (bad.details() or "")


def test_oversized_requests_are_refused_and_the_server_keeps_serving(server: Server) -> None:
    with make_channel(server.address) as channel:
        stub = svc_grpc.TokenizerStub(channel)
        many = rpc_error(stub.Encode, svc.EncodeRequest(texts=["a"] * (MAX_TEXTS + 1)))
        assert many.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{MAX_TEXTS:,}" in (many.details() or "")
        too_long = ["ab" * (MAX_TEXT_CHARS // 4), "c" * (MAX_TEXT_CHARS // 2 + 1)]  # one character over, in all
        long = rpc_error(stub.Encode, svc.EncodeRequest(texts=too_long))
        assert long.code() == grpc.StatusCode.INVALID_ARGUMENT and "4 MiB" in (long.details() or "")
        ids = rpc_error(stub.Decode, svc.DecodeRequest(ids=[svc.TokenIds(ids=[0] * (MAX_IDS + 1))]))
        assert ids.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{MAX_IDS:,}" in (ids.details() or "")
        huge = svc.EncodeRequest(texts=["x" * (65 << 20)])  # above the 64 MiB gRPC limit
        assert rpc_error(stub.Encode, huge).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the client's own limit
    # A client without a send limit: the server's receive limit refuses it.
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        assert rpc_error(svc_grpc.TokenizerStub(channel).Encode, huge).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    del huge
    with make_channel(server.address) as channel:
        assert check_health(channel) == "SERVING"
        reply = svc_grpc.TokenizerStub(channel).Encode(svc.EncodeRequest(texts=["still here"]), timeout=30)
        assert len(reply.ids) == 1 and len(reply.ids[0].ids) > 0


class TamperingService(TokenizerService):
    """Sends a doctored artifact: bytes flipped, or edited with the byte digest recomputed."""

    mode = "flip"

    def GetTokenizer(self, request: svc.GetTokenizerRequest, context: grpc.ServicerContext) -> svc.TokenizerArtifact:
        reply = super().GetTokenizer(request, context)
        if self.mode == "flip":
            reply.artifact = reply.artifact.replace(b'"bpe"', b'"bpf"', 1)
        elif self.mode == "edit":
            obj = json.loads(reply.artifact)
            obj["mergeable_ranks"][300], obj["mergeable_ranks"][301] = obj["mergeable_ranks"][301], obj[
                "mergeable_ranks"][300]
            reply.artifact = json.dumps(obj).encode()
            reply.sha256 = sha256_bytes(reply.artifact)
        return reply


def test_fetch_refuses_a_tampered_artifact(files: Files, tmp_path: Path) -> None:
    service = TamperingService(ServedArtifact.load(files.artifact))
    from pilot.grpc_util import start_grpc_server

    running = start_grpc_server([(svc_grpc.add_TokenizerServicer_to_server, service)], "127.0.0.1:0")
    address, cache = f"127.0.0.1:{running.port}", tmp_path / "cache"
    try:
        with pytest.raises(TokenizerError, match="fails its checksum"):
            fetch_tokenizer(address, cache_dir=cache)
        service.mode = "edit"  # consistent bytes digest, but the content checksum inside fails
        with pytest.raises(TokenizerError, match="refused.*fails its checksum"):
            fetch_tokenizer(address, cache_dir=cache)
        assert [p.name for p in cache.iterdir()] == []  # nothing kept, no staging left over
        service.mode = "honest"
        directory = fetch_tokenizer(address, cache_dir=cache)
        assert load_tokenizer(directory).sha256 == files.tokenizer.sha256
    finally:
        running.stop(0)
    served = serve_tokenizer(files.artifact, "127.0.0.1:0")  # the plain entry point serves the same bytes
    try:
        assert fetch_tokenizer(f"127.0.0.1:{served.port}", cache_dir=cache) == directory
    finally:
        served.stop(0)


# --------------------------------------------------------------------- the job


@dataclass
class Worker:
    cli: CliProcess
    queue: str
    out_root: Path
    client: redis.Redis
    store: JobStatusStore

    def wait(self, job_id: str) -> Any:
        def alive(_status: object) -> None:
            assert self.cli.proc.poll() is None, f"worker exited:\n{self.cli.log_tail()}"

        return self.store.wait(job_id, timeout_s=JOB_S, on_update=alive)


@pytest.fixture(scope="module")
def worker(redis_url: str, files: Files) -> Iterator[Worker]:
    """`pilot tokenizer worker` on a queue of its own (the Redis URL comes from the environment)."""
    queue, out_root = f"test.tokenizer.{uuid.uuid4().hex[:8]}", files.root / "jobs"
    cli = CliProcess(["worker", "--out-dir", str(out_root), "--queue", queue, "--threads", "1"],
                     files.root / "worker.log", env={"PILOT_REDIS_URL": redis_url})
    client = redis.Redis.from_url(redis_url)
    try:
        yield Worker(cli, queue, out_root, client, JobStatusStore(client))
    finally:
        cli.stop()
        client.close()


def submit(worker: Worker, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pilot.cli", "tokenizer", "submit", "--queue", worker.queue, *args]
    env = {**os.environ, "PILOT_REDIS_URL": redis_url}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=START_S + JOB_S)


def test_submit_wait_trains_the_tokenizer_and_records_its_sha256(worker: Worker, files: Files, redis_url: str) -> None:
    out = worker.out_root / "good"
    args = ["--input", str(files.corpus), "--vocab-size", "300", "--out", str(out)]
    done = submit(worker, redis_url, *args, "--wait", "--timeout", str(START_S + JOB_S))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{worker.cli.log_tail()}"
    job = TrainTokenizerJob(input=str(files.corpus), vocab_size=300, out=str(out))
    status = worker.store.get(tokenizer_job_id(job))
    assert status is not None and status.ok and (status.phase, status.percent, status.attempts) == ("done", 100, 1)
    assert status.sha256 in done.stdout and status.vocab_size == 300 and status.out == str(out)
    trained = load_tokenizer(out, expected_sha256=status.sha256)
    assert status.artifact_sha256 == sha256_file(out / ARTIFACT_FILE)
    assert trained.sha256 == train_bpe(files.corpus, 300, progress=False, threads=1).sha256  # same as in-process

    again = submit(worker, redis_url, *args)
    assert again.returncode == 0 and "already succeeded" in again.stdout
    # A duplicate delivery (same job, another message) is skipped: the artifact is not rewritten.
    inode = (out / ARTIFACT_FILE).stat().st_ino
    app = make_celery("test-submit", redis_url)
    try:
        result = app.send_task(TRAIN_TASK, args=[encode_job(job)], task_id=f"dup-{uuid.uuid4().hex[:8]}",
                               queue=worker.queue).get(timeout=JOB_S)
    finally:
        app.close()
    assert result["skipped"] and result["sha256"] == status.sha256
    assert (out / ARTIFACT_FILE).stat().st_ino == inode


def test_bad_jobs_are_recorded_failed_and_the_next_job_succeeds(worker: Worker, files: Files, redis_url: str) -> None:
    (files.root / "empty.txt").write_bytes(b"")
    (files.root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    bad = {
        "too small": TrainTokenizerJob(input=str(files.corpus), vocab_size=100, out=str(worker.out_root / "v100")),
        "empty corpus": TrainTokenizerJob(input=str(files.root / "empty.txt"), vocab_size=300),
        "invalid UTF-8": TrainTokenizerJob(input=str(files.root / "latin1.txt"), vocab_size=300),
        "does not exist": TrainTokenizerJob(input=str(files.root / "nope.txt"), vocab_size=300),
    }
    good = TrainTokenizerJob(input=str(files.corpus), vocab_size=320, max_chars=100_000, out="relative/good")
    app = make_celery("test-submit", redis_url)
    try:
        ids = {reason: enqueue_training(app, worker.client, job, queue=worker.queue).job_id
               for reason, job in [*bad.items(), ("ok", good)]}
    finally:
        app.close()
    for reason, job_id in ids.items():
        status = worker.wait(job_id)
        if reason == "ok":
            assert status.ok, status.reason
            assert status.out == str(worker.out_root / "relative" / "good")  # relative out: under --out-dir
            assert load_tokenizer(status.out, expected_sha256=status.sha256).vocab_size == 320
        else:
            assert status.state == "failed" and reason in status.reason and status.attempts == 1, status
    assert "vocab_size 100 is too small" in worker.store.get(ids["too small"]).reason  # type: ignore[union-attr]
    assert not (worker.out_root / "v100").exists()
    failed = submit(worker, redis_url, "--input", str(files.corpus), "--vocab-size", "100", "--out",
                    str(worker.out_root / "v100"), "--wait")  # a failed job is tried again, and fails again
    assert failed.returncode == 2 and f"job {ids['too small']} failed: vocab_size 100 is too small" in failed.stderr
    assert worker.cli.proc.poll() is None


def test_progress_reaches_the_status_hash(files: Files, redis_url: str, tmp_path: Path) -> None:
    """In-process (same code as the worker): every phase of train_bpe is published."""
    tokenizer_worker = TokenizerWorker(WorkerConfig(redis_url=redis_url, out_dir=tmp_path, threads=1))
    seen: list[tuple[str, float]] = []
    publish = tokenizer_worker.store.progress

    def record(job_id: str, phase: str, percent: float, message: str) -> None:
        seen.append((phase, percent))
        publish(job_id, phase, percent, message)

    tokenizer_worker.store.progress = record  # type: ignore[method-assign]
    job = TrainTokenizerJob(input=str(files.corpus), vocab_size=290)
    try:
        status, skipped = tokenizer_worker.handle(job)
        assert status.ok and not skipped and status.out == str(tmp_path / tokenizer_job_id(job))
        assert {phase for phase, _ in seen} == {"reading files", "learning merges"}
        assert ("learning merges", 100.0) in seen
        assert tokenizer_worker.handle(job) == (status, True)
    finally:
        tokenizer_worker.close()
    store = JobStatusStore(redis.Redis.from_url(redis_url))
    ProgressPublisher(store, "progress-test", min_interval_s=0)("learning merges", 50, 200)
    published = store.get("progress-test")
    assert published is not None and (published.phase, published.percent) == ("learning merges", 25.0)
    assert published.message == "learning merges: 50/200"


def test_serve_stops_gracefully_on_sigterm(server: Server) -> None:
    assert server.cli.stop(signal.SIGTERM) == 0, server.cli.log_tail()
    assert "grpc.stopping" in server.cli.log_tail()
