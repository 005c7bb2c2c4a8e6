"""gRPC plumbing on loopback: health checks, TLS and mutual TLS, size limits, graceful stop."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pilot.bus import unwrap, wrap
from pilot.errors import ConfigError
from pilot.grpc_util import (
    GrpcServer,
    TLSConfig,
    check_health,
    make_channel,
    peer_address,
    serve_until_signal,
    service_name,
    start_grpc_server,
)
from pilot.v1 import events_pb2 as ev
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc


class FakeCoordinator(svc_grpc.CoordinatorServicer):
    def GetStatus(self, request: svc.GetStatusRequest, context: grpc.ServicerContext) -> svc.RunStatus:
        return svc.RunStatus(schema_version=1, run_id=request.run_id or "r1", state=svc.RUN_STATE_TRAINING, round=3)

    def StopRound(self, request: svc.StopRoundRequest, context: grpc.ServicerContext) -> svc.StopRoundResponse:
        return svc.StopRoundResponse(accepted=True, round=request.round or 3)

    def WatchEvents(self, request: svc.WatchEventsRequest, context: grpc.ServicerContext) -> Iterator[ev.Event]:
        yield wrap(ev.RoundStarted(round=3, duration_s=5), "1-0", "control")
        yield wrap(ev.StopRound(round=3), "2-0", "control")


SERVICERS = [(svc_grpc.add_CoordinatorServicer_to_server, FakeCoordinator())]


@pytest.fixture
def server() -> Iterator[GrpcServer]:
    running = start_grpc_server(SERVICERS, "127.0.0.1:0")
    yield running
    running.stop(0)


def test_health_and_calls_round_trip_on_loopback(server: GrpcServer) -> None:
    with make_channel(f"127.0.0.1:{server.port}") as channel:
        assert check_health(channel) == "SERVING"
        assert check_health(channel, "pilot.v1.Coordinator") == "SERVING"
        assert check_health(channel, "pilot.v1.Nope") == "SERVICE_UNKNOWN"
        stub = svc_grpc.CoordinatorStub(channel)
        assert stub.GetStatus(svc.GetStatusRequest(run_id="abc"), timeout=5).run_id == "abc"
        events = [unwrap(e) for e in stub.WatchEvents(svc.WatchEventsRequest(run_id="abc"), timeout=5)]
        assert [type(e).__name__ for e in events] == ["RoundStarted", "StopRound"]
        server.set_serving(False, "pilot.v1.Coordinator")
        assert check_health(channel, "pilot.v1.Coordinator") == "NOT_SERVING"


def test_messages_over_the_limit_are_refused() -> None:
    small = start_grpc_server(SERVICERS, "127.0.0.1:0", max_message_bytes=1024)
    try:
        with make_channel(f"127.0.0.1:{small.port}") as channel:
            stub = svc_grpc.CoordinatorStub(channel)
            assert stub.StopRound(svc.StopRoundRequest(detail="x" * 100), timeout=5).accepted
            with pytest.raises(grpc.RpcError) as info:
                stub.StopRound(svc.StopRoundRequest(detail="x" * 4096), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        small.stop(0)


def _key_and_cert(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, tmp: Path) -> tuple[Path, Path, x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_path, cert_path = tmp / f"{name}.key", tmp / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, subject, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pki")
    _, ca_crt, ca_name, ca_key = _key_and_cert("ca", None, tmp)
    srv_key, srv_crt, _, _ = _key_and_cert("server", (ca_name, ca_key), tmp)
    cli_key, cli_crt, _, _ = _key_and_cert("client", (ca_name, ca_key), tmp)
    return {"ca": ca_crt, "srv_key": srv_key, "srv_crt": srv_crt, "cli_key": cli_key, "cli_crt": cli_crt}


def test_tls_round_trip_and_a_plaintext_client_is_refused(pki: dict[str, Path]) -> None:
    tls = TLSConfig(cert_file=pki["srv_crt"], key_file=pki["srv_key"])
    server = start_grpc_server(SERVICERS, "127.0.0.1:0", tls=tls)
    try:
        with make_channel(f"localhost:{server.port}", TLSConfig(ca_file=pki["ca"])) as channel:
            assert check_health(channel, "pilot.v1.Coordinator") == "SERVING"
            assert svc_grpc.CoordinatorStub(channel).GetStatus(svc.GetStatusRequest(), timeout=5).round == 3
        with make_channel(f"localhost:{server.port}") as plain:
            with pytest.raises(grpc.RpcError):
                svc_grpc.CoordinatorStub(plain).GetStatus(svc.GetStatusRequest(), timeout=2)
    finally:
        server.stop(0)


def test_mutual_tls_requires_a_client_certificate(pki: dict[str, Path]) -> None:
    tls = TLSConfig(cert_file=pki["srv_crt"], key_file=pki["srv_key"], ca_file=pki["ca"])
    server = start_grpc_server(SERVICERS, "127.0.0.1:0", tls=tls)
    try:
        with_cert = TLSConfig(cert_file=pki["cli_crt"], key_file=pki["cli_key"], ca_file=pki["ca"])
        with make_channel(f"localhost:{server.port}", with_cert) as channel:
            assert svc_grpc.CoordinatorStub(channel).GetStatus(svc.GetStatusRequest(), timeout=5).round == 3
        with make_channel(f"localhost:{server.port}", TLSConfig(ca_file=pki["ca"])) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                svc_grpc.CoordinatorStub(anonymous).GetStatus(svc.GetStatusRequest(), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_serve_until_signal_stops_gracefully_on_sigterm(server: GrpcServer) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert serve_until_signal(server, grace_s=0.5) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous
    with make_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError):
            svc_grpc.CoordinatorStub(channel).GetStatus(svc.GetStatusRequest(), timeout=1)


def test_configuration_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert service_name(svc_grpc.add_TokenizerServicer_to_server) == "pilot.v1.Tokenizer"
    for name in ("CERT", "KEY", "CA", "SERVER_NAME"):
        monkeypatch.delenv(f"PILOT_TLS_{name}", raising=False)
    assert TLSConfig.from_env() is None
    monkeypatch.setenv("PILOT_TLS_CA", str(tmp_path / "ca.crt"))
    assert TLSConfig.from_env() == TLSConfig(ca_file=tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match="cannot read TLS file"):
        TLSConfig(cert_file=tmp_path / "nope.crt", key_file=tmp_path / "nope.key").server_credentials()
    monkeypatch.delenv("PILOT_COORDINATOR_ADDR", raising=False)
    with pytest.raises(ConfigError, match="PILOT_COORDINATOR_ADDR"):
        peer_address("PILOT_COORDINATOR_ADDR")
    assert peer_address("PILOT_COORDINATOR_ADDR", "head:50051") == "head:50051"


class SlowCoordinator(FakeCoordinator):
    def GetStatus(self, request: svc.GetStatusRequest, context: grpc.ServicerContext) -> svc.RunStatus:
        threading.Event().wait(6.0)  # a long call that sends nothing meanwhile (as a trainer host's RunRound)
        return super().GetStatus(request, context)


def test_a_long_silent_call_survives_the_clients_keepalive_pings(tmp_path: Path, monkeypatch) -> None:
    # 1-s pings: a server still on gRPC core's default policy (5 min between pings without data, 2 strikes)
    # answers the third with GOAWAY "too_many_pings", which fails the call (a 5-min round would hit it at 30 s)
    import pilot.grpc_util as grpc_util

    monkeypatch.setattr(grpc_util, "KEEPALIVE_TIME_MS", 1_000)
    monkeypatch.setattr(grpc_util, "MIN_PING_INTERVAL_MS", 300)
    address = f"unix:{tmp_path / 's.sock'}"
    running = start_grpc_server([(svc_grpc.add_CoordinatorServicer_to_server, SlowCoordinator())], address)
    try:
        with make_channel(address) as channel:
            status = svc_grpc.CoordinatorStub(channel).GetStatus(svc.GetStatusRequest(run_id="r9"), timeout=30)
        assert status.run_id == "r9" and status.round == 3
    finally:
        running.stop(0)
