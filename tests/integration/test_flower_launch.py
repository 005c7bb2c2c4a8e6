"""A real Flower 1.41 deployment on loopback, driven by pilot.flower.LocalFederation.

One SuperLink + 2 SuperNodes over TLS (a throwaway CA made here; class-scoped:
~15-40 s to start on 2 busy cores) run the toy app in ``flower_toy/`` (copied into tmp_path): its ServerApp sends a
TRAIN message with a small ArrayRecord to every node and writes what came back
to the ``result-path`` run-config file; its ClientApp returns the array + 1 and
a MetricRecord. Proven here:

- a run completes with status finished:completed and the server saw both
  replies (right arrays, each node's partition-id, env passed through) --
  submitted with ``flwr run`` and cross-checked with ``flwr ls --format json``;
- a ServerApp that raises is reported failed (``flwr run`` itself exits 0);
- unknown run-config keys are refused before anything is submitted;
- a running run can be stopped (finished:stopped);
- a SIGKILLed node leaves no process behind and can be started again;
- after the ``with`` block, and after SIGTERM to a parent holding an
  (insecure) federation, no child process remains;
- (slow) the same app runs on the Ray simulation engine of a ``--simulation``
  SuperLink, sized with ``--federation-config``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pilot.errors import ConfigError
from pilot.flower import LocalFederation, check_run_config, format_run_config, flwr_ls, leftover_processes
from pilot.flower.runs import bin_dir

TOY = Path(__file__).parent / "flower_toy"
pytestmark = pytest.mark.timeout(420)


def test_run_config_string_round_trips_through_flowers_parser() -> None:
    from flwr.common.config import parse_config_args

    values = {"s": 'say "hi" to C:\\tmp', "t": "two words\tand a tab", "i": -3, "f": 2.0, "g": 1e-5,
              "b": False, "nested.key": "x"}
    assert parse_config_args([format_run_config(values)]) == values
    with pytest.raises(ConfigError):
        format_run_config({"bad key": 1})
    with pytest.raises(ConfigError):
        format_run_config({"k": "both ' and \""})
    defaults = {"n": 2, "x": 1.5, "s": "auto"}
    assert check_run_config({"x": 3, "s": 0.7}, defaults) == {"x": 3.0, "s": 0.7}  # int -> float; union keys pass
    assert isinstance(check_run_config({"x": 3}, defaults)["x"], float)
    with pytest.raises(ConfigError, match="'n'"):
        check_run_config({"n": "two"}, defaults, strict_types=True)
    with pytest.raises(ConfigError, match="'y'"):
        check_run_config({"y": 1}, defaults)


def _make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost (PEM files in ``d``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("pilot-test-ca")).issuer_name(name("pilot-test-ca"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    paths = (d / "ca.pem", d / "server.pem", d / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _copy_toy(dst: Path) -> Path:
    shutil.copytree(TOY, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture(scope="class")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    base = tmp_path_factory.mktemp("flower")
    app = _copy_toy(base / "toyapp")
    seen: set[int] = set()
    tls = _make_tls(base / "tls")
    with LocalFederation(
        app, 2, log_dir=base / "logs", env={"PILOT_TOY_MARKER": "from-test"}, tls=tls, grace_s=3.0
    ) as f:
        yield f
        seen.update(f.pids())
    assert leftover_processes(sorted(seen)) == [], "Flower processes left after the federation closed"


class TestDeployment:
    """One TLS SuperLink + 2 SuperNodes shared by these tests (torn down after the class)."""

    def test_run_completes_and_server_sees_both_replies(self, fed: LocalFederation, tmp_path: Path) -> None:
        result = tmp_path / "result.json"
        t0 = time.time()
        run_id = fed.submit({"result-path": str(result), "num-nodes": 2, "array-size": 1000})
        status = fed.wait(run_id, timeout=240)
        assert status.succeeded, status
        assert not status.failed

        out = json.loads(result.read_text())
        (rnd,) = out["rounds"]
        assert rnd["missing"] == 0
        replies = rnd["replies"]
        assert len(replies) == 2
        assert all(r["array-ok"] for r in replies)
        assert sorted(r["metrics"]["partition-id"] for r in replies) == [0, 1]
        assert {r["src"] for r in replies} == {str(n) for n in fed.node_ids}
        assert {r["info"]["node-id"] for r in replies} == {str(n) for n in fed.node_ids}  # context.node_id
        assert all(r["info"]["env-marker"] == "from-test" for r in replies)
        assert out["run-config"]["array-size"] == 1000  # override reached the ServerApp's context.run_config
        assert all(r["info"]["run-config-array-size"] == 1000 for r in replies)  # ... and the ClientApp's
        assert all(r["info"]["node-config-keys"] == "num-partitions,partition-id" for r in replies)

        # The public CLI agrees with the in-process Control API.
        (row,) = flwr_ls(str(bin_dir() / "flwr"), fed.connection, fed.env, run_id=run_id)
        assert row.text == "finished:completed"
        # Timings, for the report (-s shows them).
        print(
            f"\nsubmit->ServerApp main: {out['server-start-wall'] - t0:.1f}s; "
            + "; ".join(
                f"push->ClientApp process {r['info']['proc-start-wall'] - rnd['push-wall']:.1f}s, "
                f"process->train() {r['metrics']['proc-start-to-train-s']:.1f}s, "
                f"push->reply {r['recv-wall'] - rnd['push-wall']:.1f}s"
                for r in replies
            )
        )

    def test_failing_serverapp_is_reported_failed(self, fed: LocalFederation) -> None:
        run_id = fed.submit({"fail": True}, via="api")
        status = fed.wait(run_id, timeout=180)
        assert status.finished and status.failed and not status.succeeded
        assert status.sub_status == "failed"
        assert "asked to fail" in status.details
        assert "asked to fail" in (fed.log_dir / f"run-{run_id}.log").read_text()

    def test_stop_run_ends_a_running_run_as_stopped(self, fed: LocalFederation) -> None:
        run_id = fed.submit({"num-nodes": 3, "wait-nodes-s": 300.0}, via="api")  # waits for a 3rd node
        deadline = time.monotonic() + 120
        while fed.status(run_id).status != "running":
            assert time.monotonic() < deadline, fed.status(run_id)
            time.sleep(0.5)
        assert fed.stop_run(run_id)
        status = fed.wait(run_id, timeout=60)
        assert status.finished and status.sub_status == "stopped" and status.failed

    def test_unknown_run_config_key_is_refused_before_submit(self, fed: LocalFederation) -> None:
        with pytest.raises(ConfigError, match="no-such-key"):
            fed.submit({"no-such-key": 1})

    def test_killed_node_leaves_nothing_and_restarts(self, fed: LocalFederation) -> None:
        pids = fed.node_pids(1)
        assert len(pids) >= 2  # flower-supernode + its flower-superexec
        old_id = fed.node_ids[1]
        fed.kill_node(1)
        assert not fed.node_alive(1)
        assert leftover_processes(pids) == []
        new_id = fed.start_node(1)
        assert fed.node_alive(1) and new_id != old_id  # Flower gives a restarted node a new id


PARENT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from pilot.flower import LocalFederation
    with LocalFederation(Path(sys.argv[1]), 1, log_dir=Path(sys.argv[2]), grace_s=2.0) as fed:
        print(json.dumps(fed.pids()), flush=True)
        time.sleep(600)
    """
)


def test_sigterm_to_parent_stops_every_child(tmp_path: Path) -> None:
    app = _copy_toy(tmp_path / "toyapp")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(app), str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PILOT_LOG_LEVEL": "WARNING"},
    )
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        pids = json.loads(line)
        assert len(pids) >= 4  # superlink + its superexec, supernode + its superexec
        assert all(psutil.pid_exists(p) for p in pids)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == -signal.SIGTERM  # re-raised after cleanup
        assert leftover_processes(pids) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulation_engine_runs_the_same_app(tmp_path: Path) -> None:
    app = _copy_toy(tmp_path / "toyapp")
    result = tmp_path / "result.json"
    with LocalFederation(app, 0, log_dir=tmp_path / "logs", simulation=True, grace_s=3.0) as sim:
        run_id = sim.submit(
            {"result-path": str(result), "num-nodes": 3, "rounds": 2},
            federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0},
        )
        status = sim.wait(run_id, timeout=480)
        pids = sim.pids()
    assert status.succeeded, status
    out = json.loads(result.read_text())
    for rnd in out["rounds"]:
        assert sorted(r["metrics"]["partition-id"] for r in rnd["replies"]) == [0, 1, 2]
        assert all(r["array-ok"] for r in rnd["replies"])
    assert leftover_processes(pids) == []
