"""The Evaluator gRPC service (``pilot.v1.Evaluator`` in proto/pilot/v1/services.proto).

- ``Evaluate(EvaluateRequest{job})``: idempotent per (run, round). A round with
  a stored successful result answers ``already_done`` without enqueueing;
  otherwise the job goes on the evaluation queue (``enqueue_evaluation``) and the
  answer carries its task id ``eval:<run>:<round>``. A job that cannot be
  evaluated is refused with INVALID_ARGUMENT naming the field; an unreachable
  broker or Redis gives UNAVAILABLE (the caller may retry).
- ``GetResults(GetResultsRequest{run_id, from_round})``: the run's stored results
  as ``EvalCompleted`` messages ordered by round (a round that failed and never
  succeeded appears with status FAILED and the reason).

:func:`serve_evaluator` starts it with the shared plumbing (health service,
size limits, optional TLS from ``$PILOT_TLS_*``); ``pilot evaluator --grpc-port``
runs it inside the worker process.
"""

from __future__ import annotations

import grpc
import redis
from celery import Celery

from pilot.errors import ConfigError, RetryableError
from pilot.grpc_util import GrpcServer, TLSConfig, start_grpc_server
from pilot.jobs import EVAL_QUEUE, BadJob, evaluation_task_id
from pilot.log import get_logger
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc

from services.evaluator.queue import check_job, enqueue_evaluation
from services.evaluator.results import ResultStore

log = get_logger(__name__)


class EvaluatorService(svc_grpc.EvaluatorServicer):
    """Enqueue evaluations and read stored results for any run."""

    def __init__(self, client: redis.Redis, app: Celery, *, queue: str = EVAL_QUEUE) -> None:
        self.client, self.app, self.queue = client, app, queue

    def Evaluate(self, request: svc.EvaluateRequest, context: grpc.ServicerContext) -> svc.EvaluateResponse:
        job = request.job
        try:
            check_job(job)
            task_id = evaluation_task_id(job.run_id, job.round)
            if ResultStore(self.client, job.run_id).get(job.round) is not None:
                return svc.EvaluateResponse(accepted=True, job_id=task_id, already_done=True)
            enqueue_evaluation(self.app, job, queue=self.queue)
        except BadJob as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RetryableError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        log.info("evaluation enqueued over gRPC", run_id=job.run_id, round=job.round, task_id=task_id)
        return svc.EvaluateResponse(accepted=True, job_id=task_id, already_done=False)

    def GetResults(self, request: svc.GetResultsRequest, context: grpc.ServicerContext) -> svc.GetResultsResponse:
        try:
            results = ResultStore(self.client, request.run_id).all(from_round=request.from_round)
        except ConfigError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RetryableError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return svc.GetResultsResponse(results=[r.to_event() for r in results])


def serve_evaluator(
    client: redis.Redis, app: Celery, address: str, *, queue: str = EVAL_QUEUE, tls: TLSConfig | None = None
) -> GrpcServer:
    """Start the Evaluator service (plus health) on ``address`` (``host:port``; port 0 = a free one)."""
    service = EvaluatorService(client, app, queue=queue)
    return start_grpc_server(
        [(svc_grpc.add_EvaluatorServicer_to_server, service)], address, tls=tls or TLSConfig.from_env()
    )
