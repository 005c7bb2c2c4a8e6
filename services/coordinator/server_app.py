"""The coordinator's Flower ServerApp: one federated run, from run-config to the last checkpoint.

``main(grid, context)`` builds the :class:`~pilot.run_config.RunConfig` once from
Flower's run-config (unknown keys or bad values refuse the run, naming the key),
connects to Redis (``redis-url``, ``$PILOT_REDIS_URL``, or an embedded server in
the run dir when neither is set — handy for ``flwr run .`` on a laptop), restores
the run state (a restarted coordinator resumes at the last closed round, with the
same weights and outer momentum), serves the Coordinator gRPC API, and runs the
rounds. Every checkpoint (round 0's initial weights included) is handed to the
evaluator as a Celery job; the coordinator never waits for it. With
``eval-inline=true`` (the shakespeare task's default; ``flwr run .`` simulation
runs no Celery worker) the coordinator scores each checkpoint itself, between
rounds, with the evaluator's own code (:class:`~services.evaluator.worker.EvalWorker`):
the same result is stored and the same ``EvalCompleted`` published.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pilot.bus import Bus, RedisUnavailable, redis_client
from pilot.errors import PilotError
from pilot.grpc_util import TLSConfig, start_grpc_server
from pilot.ledger import Ledger
from pilot.log import bind_run, configure, get_logger
from pilot.redis_server import EmbeddedRedis
from pilot.run_config import RunConfig, run_config_from
from pilot.v1 import events_pb2 as ev
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc
from services.coordinator.control import CoordinatorService, RunControl, write_address
from services.coordinator.rounds import RoundController, round_or_nan
from services.coordinator.state import RunAssets, prepare_run, restore_state, save_round

log = get_logger(__name__)
app = ServerApp()

BIND_ENV = "PILOT_COORDINATOR_BIND"  # interface of the gRPC API (default 127.0.0.1; 0.0.0.0 in containers)
PORT_ENV = "PILOT_COORDINATOR_PORT"  # its port when run-config coordinator-port is 0 (default: any free port)


def redact_url(url: str) -> str:
    """``url`` without its password (what may be written to logs and events)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _redis_url(cfg: RunConfig, stack: ExitStack) -> str:
    url = cfg.redis_url or os.environ.get("PILOT_REDIS_URL", "")
    if url:
        return url
    server = stack.enter_context(EmbeddedRedis(cfg.run_dir() / "redis"))
    os.environ["PILOT_REDIS_URL"] = server.url  # trainers started from here (simulation) inherit it
    log.info("no redis-url given: started an embedded Redis", url=server.url.split("@")[-1])
    return server.url


def _inline_evaluation(cfg: RunConfig, redis_url: str, assets: RunAssets, stack: ExitStack):  # type: ignore[no-untyped-def]
    """Score each checkpoint here and now, as the evaluation worker would (stored once per round)."""
    from pilot.v1.jobs_pb2 import EvaluateCheckpointJob
    from services.evaluator.evaluation import run_eval_settings
    from services.evaluator.tracking import WandbSettings
    from services.evaluator.worker import EvalWorker, WorkerConfig

    tracking = WandbSettings(enabled=bool(cfg.wandb_project), project=cfg.wandb_project or "pilot")
    worker = EvalWorker(WorkerConfig(redis_url=redis_url, eval=run_eval_settings(cfg, assets.shard_dir),
                                     wandb=tracking, max_retries=0))
    stack.callback(worker.close)

    def evaluate(round: int, uri: str, sha256: str, tokens: int) -> None:
        job = EvaluateCheckpointJob(run_id=cfg.run_id, round=round, uri=uri, sha256=sha256, tokens=tokens)
        try:
            result = worker.handle(job)  # records a failed evaluation itself
        except (RedisUnavailable, PilotError) as exc:  # could not even record it: the run goes on
            log.warning("inline evaluation not recorded", round=round, reason=str(exc))
            return
        log.info("checkpoint evaluated inline", round=round, status=result.status, val_loss=result.loss,
                 bpb=result.bpb, eval_s=round_or_nan(result.eval_s))

    return evaluate


def _evaluation_hook(cfg: RunConfig, redis_url: str, assets: RunAssets, stack: ExitStack):  # type: ignore[no-untyped-def]
    if not cfg.evaluate:
        return lambda *args: None
    if cfg.eval_inline:
        return _inline_evaluation(cfg, redis_url, assets, stack)
    from pilot.errors import RetryableError
    from pilot.jobs import make_celery
    from pilot.v1.jobs_pb2 import EvaluateCheckpointJob
    from services.evaluator.queue import enqueue_evaluation

    celery = make_celery("pilot.coordinator", redis_url)

    def enqueue(round: int, uri: str, sha256: str, tokens: int) -> None:
        job = EvaluateCheckpointJob(run_id=cfg.run_id, round=round, uri=uri, sha256=sha256, tokens=tokens)
        try:
            enqueue_evaluation(celery, job)
        except (RetryableError, PilotError) as exc:  # the run goes on; the evaluation can be re-requested
            log.warning("evaluation not enqueued", round=round, reason=str(exc))

    return enqueue


def run_coordinator(grid: Grid, cfg: RunConfig) -> int:
    """Run (or resume) the federated run; returns the last closed round."""
    bind_run(run_id=cfg.run_id)
    with ExitStack() as stack:
        redis_url = _redis_url(cfg, stack)
        cfg = cfg.model_copy(update={"redis_url": redis_url})  # trainers learn it from their round order
        client = redis_client(redis_url)
        bus, ledger = Bus(client, cfg.run_id), Ledger(client, cfg.run_id)
        assets = prepare_run(cfg, ledger)
        state = restore_state(cfg, assets)
        resumed_from = state.round if state.checkpoint is not None else 0
        control = RunControl(cfg.run_id)
        service = CoordinatorService(control, bus, alive=lambda: [str(n) for n in grid.get_node_ids()])
        bind = os.environ.get(BIND_ENV, "127.0.0.1")
        port = cfg.coordinator_port or int(os.environ.get(PORT_ENV, "0"))
        server = start_grpc_server([(svc_grpc.add_CoordinatorServicer_to_server, service)],
                                   f"{bind}:{port}", tls=TLSConfig.from_env())
        stack.callback(server.stop, 2.0)
        write_address(assets.run_dir, f"127.0.0.1:{server.port}" if bind in ("0.0.0.0", "::") else
                      f"{bind}:{server.port}")
        enqueue = _evaluation_hook(cfg, redis_url, assets, stack)
        bus.publish(ev.RunStarted(
            model=cfg.preset, strategy=cfg.outer, min_trainers=cfg.min_trainers, num_rounds=cfg.rounds,
            round_duration_s=cfg.round_seconds, resumed_from_round=resumed_from,
            config_json=json.dumps({**cfg.as_run_config(), "redis-url": redact_url(cfg.redis_url)}, sort_keys=True),
        ))
        if state.checkpoint is None:  # round 0: the initial weights, evaluated like any round
            path, sha256 = save_round(cfg, assets, state, extra={"initial": True})
            bus.publish(ev.CheckpointPublished(round=0, uri=str(path), sha256=sha256, tokens=0))
            enqueue(0, str(path), sha256, 0)
        control.update(round=state.round, tokens_total=state.tokens,
                       last_checkpoint_uri=str(state.checkpoint or ""))
        controller = RoundController(grid, cfg, assets, state, bus, control, on_checkpoint=enqueue)
        reason, detail = ev.STOP_REASON_COMPLETED, f"{cfg.rounds} rounds done"
        try:
            for round in range(state.round + 1, cfg.rounds + 1):
                if control.stop_run_requested:
                    reason, detail = ev.STOP_REASON_RUN_STOPPING, control.stop_run_requested
                    break
                controller.run_round(round)
            if control.stop_run_requested and reason == ev.STOP_REASON_COMPLETED and state.round < cfg.rounds:
                reason, detail = ev.STOP_REASON_RUN_STOPPING, control.stop_run_requested
        except BaseException as exc:
            bus.publish(ev.RunStopped(reason=ev.STOP_REASON_FAILED, detail=f"{type(exc).__name__}: {exc}",
                                      last_round=state.round))
            raise
        control.update(state=svc.RUN_STATE_STOPPED)
        bus.publish(ev.RunStopped(reason=reason, detail=detail, last_round=state.round))
        log.info("run stopped", reason=ev.StopReason.Name(reason), last_round=state.round)
        return state.round


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure(service="coordinator")
    cfg = run_config_from(dict(context.run_config), source="run-config")
    run_coordinator(grid, cfg)
