"""The evaluator service: bits per byte for every aggregated checkpoint, results, samples, wandb.

- ``queue``        ``enqueue_evaluation(app, job)``: what the coordinator calls (no torch import)
- ``evaluation``   ``Evaluator`` / ``evaluate_checkpoint``: verify, load, score and sample one
                   checkpoint (the one path shared by the worker, ``pilot eval`` and ``pilot sample``)
- ``results``      ``EvalResult`` and ``ResultStore``: one result per (run, round) in Redis, stored
                   and announced (``EvalCompleted``) atomically
- ``tracking``     wandb logging (offline unless configured)
- ``worker``       the Celery app and task; ``run_worker(config)`` is ``pilot evaluator``
- ``grpc_server``  the ``pilot.v1.Evaluator`` service (Evaluate, GetResults)

This package imports only the light modules; import ``worker`` or
``evaluation`` explicitly where torch is welcome.
"""

from services.evaluator.queue import EVALUATE_TASK, check_job, enqueue_evaluation
from services.evaluator.results import EvalResult, ResultStore

__all__ = ["EVALUATE_TASK", "EvalResult", "ResultStore", "check_job", "enqueue_evaluation"]
