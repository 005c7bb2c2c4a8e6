"""The tokenizer service: BPE training jobs on a Celery queue, and the artifact served over gRPC.

- ``queue``        ``enqueue_training(app, client, job)``: what ``pilot tokenizer submit`` calls;
                   job ids derived from (input, vocab, max_chars, doc_cap, out)
- ``status``       ``JobStatusStore``: each job's state, progress and outcome in a Redis hash
- ``worker``       the Celery app and ``train_tokenizer`` task; ``run_worker(config)`` is
                   ``pilot tokenizer worker``
- ``grpc_server``  the ``pilot.v1.Tokenizer`` service (GetTokenizer, Encode, Decode);
                   ``serve_tokenizer`` is ``pilot tokenizer serve``

The client side (``fetch_tokenizer``: a verified, cached copy of the served
artifact) lives in ``pilot/tokenizer_client.py``, since trainers use it.
"""

from services.tokenizer.queue import TRAIN_TASK, Submission, enqueue_training, tokenizer_job_id
from services.tokenizer.status import JobStatus, JobStatusStore

__all__ = ["TRAIN_TASK", "JobStatus", "JobStatusStore", "Submission", "enqueue_training", "tokenizer_job_id"]
