"""gRPC plumbing shared by the coordinator, tokenizer and evaluator services.

- :func:`start_grpc_server` binds the given servicers on one address, adds the
  standard ``grpc.health.v1.Health`` service (status per service name plus the
  overall ``""``), optional TLS (mutual when a client CA is given), and the
  message-size limits below set on purpose.
- :func:`serve_until_signal` blocks until SIGTERM/SIGINT, then marks every
  service NOT_SERVING and stops gracefully (in-flight calls get ``grace_s``).
- :func:`make_channel` opens a client channel with the same limits and TLS.
- :func:`check_health` asks a server's health service (used by tests, compose
  healthchecks and clients that wait for a peer).
- :func:`peer_address` fails fast when a required peer address is not configured.

Message size: the largest message Pilot sends over gRPC is a tokenizer
artifact (a 65,536-token vocabulary is ~1 MB as tiktoken ranks) or an encode
batch; model weights travel inside Flower messages, never here. 64 MiB leaves
room for big vocabularies and batches while refusing runaway messages.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pilot.errors import ConfigError, RetryableError
from pilot.log import get_logger

log = get_logger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Keepalive: clients ping every KEEPALIVE_TIME_MS; servers accept pings that far apart even while a call sends
# no data (a trainer host's RunRound answers after minutes). gRPC core's server default (5 min between pings,
# 2 strikes) answers 30-s pings during a long call with GOAWAY "too_many_pings".
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = KEEPALIVE_TIME_MS // 3  # what a server tolerates between pings without data
"""Send and receive limit for every Pilot gRPC message (see module docstring)."""
DEFAULT_MAX_WORKERS = 16
TLS_ENV_PREFIX = "PILOT_TLS_"

AddFn = Callable[[Any, grpc.Server], None]
"""A generated ``add_<Service>Servicer_to_server`` function."""


@dataclass(frozen=True)
class TLSConfig:
    """TLS files. Server: cert+key, and ``ca_file`` to require client certs (mTLS).
    Client: ``ca_file`` to verify the server, cert+key to present one (mTLS)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    server_name: str | None = None  # client: expected name in the server cert, when it differs from the address

    @classmethod
    def from_env(cls, prefix: str = TLS_ENV_PREFIX) -> TLSConfig | None:
        """From ``PILOT_TLS_CERT``/``_KEY``/``_CA``/``_SERVER_NAME``; None when none is set."""
        values = {name: os.environ.get(prefix + name) or None for name in ("CERT", "KEY", "CA", "SERVER_NAME")}
        if not any(values.values()):
            return None
        as_path = lambda v: Path(v) if v else None  # noqa: E731
        return cls(as_path(values["CERT"]), as_path(values["KEY"]), as_path(values["CA"]), values["SERVER_NAME"])

    @staticmethod
    def _read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file {path}: {exc.strerror}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key = self._read(self.cert_file), self._read(self.key_file)
        if cert is None or key is None:
            raise ConfigError("a TLS server needs both a certificate and a key (PILOT_TLS_CERT, PILOT_TLS_KEY)")
        ca = self._read(self.ca_file)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a TLS client certificate needs both cert and key (PILOT_TLS_CERT, PILOT_TLS_KEY)")
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca_file),
            private_key=self._read(self.key_file),
            certificate_chain=self._read(self.cert_file),
        )


def _limits(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def service_name(add_fn: AddFn) -> str:
    """Full service name (``pilot.v1.Coordinator``) of a generated ``add_XServicer_to_server``."""
    short = add_fn.__name__.removeprefix("add_").removesuffix("Servicer_to_server")
    module = sys.modules.get(add_fn.__module__)
    for value in vars(module).values() if module else ():
        services = getattr(getattr(value, "DESCRIPTOR", None), "services_by_name", None)
        if services and short in services:
            return str(services[short].full_name)
    raise ConfigError(f"cannot find the service of {add_fn.__module__}.{add_fn.__name__}")


@dataclass
class GrpcServer:
    """A started server: the grpc.Server, the bound port, and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: list[str] = field(default_factory=list)

    def set_serving(self, serving: bool, service: str | None = None) -> None:
        """Mark one service (or all, and the overall "") SERVING / NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [service] if service is not None else ["", *self.services]:
            self.health.set(name, status)

    def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING for everyone, then stop, letting in-flight calls finish within ``grace_s``."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def start_grpc_server(
    servicers: Sequence[tuple[AddFn, Any]],
    address: str,
    *,
    tls: TLSConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> GrpcServer:
    """Start a server for ``servicers`` (pairs of add function and servicer) on ``address``.

    ``address`` is ``host:port``; port 0 picks a free one (see ``.port``). All
    services, and the health service itself, start SERVING.
    """
    options = _limits(max_message_bytes) + [
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ("grpc.keepalive_permit_without_calls", 1),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; the C macro's name is not its string
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add_fn, servicer in servicers:
        add_fn(servicer, server)
        names.append(service_name(add_fn))
    try:
        port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot bind gRPC server to {address} (address in use?)")
    server.start()
    running = GrpcServer(server, port, health_servicer, names)
    running.set_serving(True)
    log.info("grpc.started", address=address, port=port, tls=tls is not None, services=names)
    return running


def serve_until_signal(server: GrpcServer, grace_s: float = 5.0) -> int:
    """Block until SIGTERM or SIGINT, then stop gracefully; returns the signal number.

    Must be called from the main thread (Python delivers signals there).
    """
    received = threading.Event()
    caught: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        caught.append(signum)
        received.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        received.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("grpc.stopping", signal=caught[0], grace_s=grace_s)
    server.stop(grace_s)
    return caught[0]


def make_channel(
    address: str,
    tls: TLSConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A client channel to ``address`` with Pilot's limits (and TLS when given)."""
    options = _limits(max_message_bytes) + [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging through a long call that sends nothing
    ]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


def check_health(channel: grpc.Channel, service: str = "", timeout_s: float = 5.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) of ``service`` ("" = whole server).

    Raises :class:`~pilot.errors.RetryableError` when the server cannot be reached.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError as exc:
        code, details = (exc.code(), exc.details()) if isinstance(exc, grpc.Call) else (None, str(exc))
        if code == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        raise RetryableError(f"health check of {service or 'server'} failed: {code}: {details}") from exc
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def peer_address(name: str, value: str | None = None) -> str:
    """``value``, else ``$name``; a clear :class:`ConfigError` when neither is set."""
    address = value or os.environ.get(name)
    if not address:
        raise ConfigError(f"required peer address missing: pass it or set ${name} (host:port)")
    return address
