"""``pilot status``, ``pilot round stop`` and ``pilot stop``: talk to a running coordinator.

The coordinator serves the Coordinator gRPC API and writes its address to
``<run_dir>/coordinator.json``; these commands find it from ``--run-dir`` (or
``--run RUN`` under ``$PILOT_BASE_DIR/runs``), or take ``--coordinator HOST:PORT``
directly (another machine; TLS from ``PILOT_TLS_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pilot.cli.common import user_errors
from pilot.errors import ConfigError

RunOpt = Annotated[Optional[str], typer.Option("--run", help="run id (its dir under $PILOT_BASE_DIR/runs)")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="the run's directory")]
AddressOpt = Annotated[Optional[str], typer.Option("--coordinator", help="coordinator API HOST:PORT")]

round_app = typer.Typer(help="Control the open round of a running federated run.", no_args_is_help=True)


def _stub(run: str | None, run_dir: Path | None, address: str | None):  # type: ignore[no-untyped-def]
    from pilot import paths
    from pilot.grpc_util import TLSConfig, make_channel
    from pilot.v1 import services_pb2_grpc as svc_grpc
    from services.coordinator.control import read_address

    if address is None:
        directory = run_dir or (paths.run_dir(run) if run else None)
        if directory is None:
            raise ConfigError("name the run: --run RUN, --run-dir DIR or --coordinator HOST:PORT")
        address = read_address(directory)
        if address is None:
            raise ConfigError(f"no coordinator address in {directory} (is the run's coordinator running?)")
    return svc_grpc.CoordinatorStub(make_channel(address, tls=TLSConfig.from_env()))


def _call(method, request):  # type: ignore[no-untyped-def]
    import grpc

    from pilot.errors import RetryableError

    try:
        return method(request, timeout=10)
    except grpc.RpcError as exc:
        raise RetryableError(f"coordinator API: {exc.code().name}: {exc.details()}") from None


def status_command(run: RunOpt = None, run_dir: RunDirOpt = None, coordinator: AddressOpt = None,
                   json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Where a run stands: round, time in the round, trainers, tokens, last checkpoint and BPB."""
    with user_errors():
        from google.protobuf.json_format import MessageToDict

        from pilot.v1 import services_pb2 as svc

        status = _call(_stub(run, run_dir, coordinator).GetStatus, svc.GetStatusRequest())
        if json_out:
            import json

            typer.echo(json.dumps(MessageToDict(status, preserving_proto_field_name=True), indent=2))
            return
        state = svc.RunState.Name(status.state).removeprefix("RUN_STATE_").lower()
        typer.echo(f"run {status.run_id}: {state}, round {status.round} ({status.round_elapsed_s:.0f} s in)")
        typer.echo(f"trainers connected: {', '.join(status.trainers_alive) or 'none'}; "
                   f"participants: {', '.join(status.participants) or 'none'}")
        bpb = f"{status.last_bpb:.4f}" if status.last_bpb else "not yet"
        typer.echo(f"tokens: {status.tokens_total:,}; last checkpoint: {status.last_checkpoint_uri or '-'}; "
                   f"last val BPB: {bpb}")


@round_app.command("stop")
def round_stop_command(run: RunOpt = None, run_dir: RunDirOpt = None, coordinator: AddressOpt = None,
                       round: Annotated[int, typer.Option(help="round to stop (0: the open one)")] = 0,
                       detail: Annotated[str, typer.Option(help="why (shown in the event)")] = "pilot round stop",
                       ) -> None:
    """End the open round now: trainers reply with what they have, the round closes."""
    with user_errors():
        from pilot.v1 import services_pb2 as svc

        reply = _call(_stub(run, run_dir, coordinator).StopRound, svc.StopRoundRequest(round=round, detail=detail))
        if not reply.accepted:
            raise ConfigError(f"stop refused: {reply.message}")
        typer.echo(f"round {reply.round}: stop requested")


def stop_command(run: RunOpt = None, run_dir: RunDirOpt = None, coordinator: AddressOpt = None,
                 detail: Annotated[str, typer.Option(help="why (shown in the event)")] = "pilot stop") -> None:
    """End the run after the current round closes."""
    with user_errors():
        from pilot.v1 import services_pb2 as svc

        reply = _call(_stub(run, run_dir, coordinator).StopRun, svc.StopRunRequest(detail=detail))
        typer.echo(reply.message)


def register(app: typer.Typer) -> None:
    app.command("status")(status_command)
    app.command("stop")(stop_command)
    app.add_typer(round_app, name="round")
