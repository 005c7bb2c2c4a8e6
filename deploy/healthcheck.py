#!/usr/bin/env python
"""Container healthchecks for Pilot's compose services (installed as ``pilot-healthcheck``).

    pilot-healthcheck http URL [--ca FILE] [--timeout S]
        GET URL (Flower's ``/health`` on the SuperLink and SuperNodes); healthy on HTTP 200.
        ``--ca`` verifies an https URL against that CA (the lab's ca.crt).
    pilot-healthcheck grpc HOST:PORT [--ca FILE] [--server-name NAME] [--service NAME] [--timeout S]
        ``grpc.health.v1.Health/Check`` (Pilot's gRPC services, Flower's
        ``--health-server-address``); healthy when SERVING. With ``--ca`` the channel
        is TLS, verified against that CA (``--server-name`` when the certificate
        names the server differently from HOST).

Exit status 0 = healthy, 1 = not healthy (the reason on stderr), 2 = bad arguments.
Only the standard library and grpcio (both in the image) are used, and no
``PILOT_TLS_*`` variable is read: a server's own cert/key must not turn its
healthcheck into a client presenting them.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request


def check_http(url: str, ca: str | None, timeout: float) -> str | None:
    """None when ``url`` answers 200, else why not."""
    context = ssl.create_default_context(cafile=ca) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:  # noqa: S310 (fixed URLs)
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


def check_grpc(address: str, ca: str | None, server_name: str | None, service: str, timeout: float) -> str | None:
    """None when the health service says SERVING, else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca:
        with open(ca, "rb") as handle:
            credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return f"{code}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None if status == "SERVING" else status


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pilot-healthcheck", description="Healthchecks of Pilot's containers.")
    sub = root.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http", help="GET a URL, healthy on 200")
    http.add_argument("url")
    http.add_argument("--ca", help="CA file to verify an https URL")
    http.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    grpc_ = sub.add_parser("grpc", help="grpc.health.v1 Check, healthy when SERVING")
    grpc_.add_argument("address", help="HOST:PORT")
    grpc_.add_argument("--ca", help="CA file: use TLS, verified against it")
    grpc_.add_argument("--server-name", help="name the server certificate must carry, when not HOST")
    grpc_.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    grpc_.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.kind == "http":
        problem = check_http(args.url, args.ca, args.timeout)
        target = args.url
    else:
        problem = check_grpc(args.address, args.ca, args.server_name, args.service, args.timeout)
        target = args.address
    if problem is not None:
        print(f"unhealthy: {target}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
