"""Every Redis key name Pilot uses, in one place.

Each run owns the keys under ``pilot:<run_id>:``; the only global key is the
run registry ``pilot:runs``. Nothing else in the code base spells a key, so a
reader can see here everything a run stores in Redis, and deleting a run means
deleting the keys listed by :func:`run_keys` (never FLUSHDB, never KEYS).

Streams (facts, see pilot/bus):
    pilot:<run>:stream:control      round/run lifecycle events (uncapped)
    pilot:<run>:stream:telemetry    trainer heartbeats and progress (capped, MAXLEN ~)
    pilot:<run>:stream:deadletter   entries a consumer could not process, with the reason

Data ledger (see pilot/ledger.py):
    pilot:<run>:ledger:meta         hash: epoch, fingerprint, units, tokens_total, lease_seq
    pilot:<run>:ledger:units        hash: unit id -> size (tokens or rows)
    pilot:<run>:ledger:order        hash: unit id -> position in the epoch order
    pilot:<run>:ledger:pending      sorted set: unit id -> priority (lower is leased first)
    pilot:<run>:ledger:leases       sorted set: unit id -> lease expiry (Redis server ms)
    pilot:<run>:ledger:owner        hash: unit id -> "<trainer_id>|<lease token>"
    pilot:<run>:ledger:cursor       hash: unit id -> in-unit offset already trained
    pilot:<run>:ledger:done         set: unit ids completed in the current epoch
    pilot:<run>:ledger:tokens:trainer  hash: trainer id -> tokens trained (all epochs)
    pilot:<run>:ledger:tokens:round    hash: round -> tokens trained
    pilot:<run>:ledger:receipts     hash: trainer id -> token of its last finished lease (idempotent retries)

Evaluation results (see services/evaluator/results.py):
    pilot:<run>:eval:results        hash: round -> JSON of the successful evaluation (written once, together
                                    with its EvalCompleted on the control stream, by one Lua script)
    pilot:<run>:eval:failed         hash: round -> JSON of the latest failed evaluation (cleared on success)

Tokenizer training jobs (see services/tokenizer/status.py; global, not per run):
    pilot:tokenizer:job:<job id>    hash: state (queued/running/ok/failed), phase, percent, message, reason,
                                    sha256 (tokenizer identity), artifact_sha256 (tokenizer.json bytes),
                                    vocab_size, input, out, elapsed_s, attempts, updated_at
    The job id is derived from the job's (input, vocab, max_chars, doc_cap, out). No run key has a
    ``job:`` part, so even a run called "tokenizer" cannot collide with these.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pilot.errors import ConfigError

PREFIX = "pilot"
RUNS = f"{PREFIX}:runs"
"""Global sorted set: run id -> first start (unix seconds); written by Bus.publish(RunStarted)."""
TOKENIZER_JOB_PREFIX = f"{PREFIX}:tokenizer:job:"
"""Global: prefix of the tokenizer training jobs' status hashes (see :func:`tokenizer_job`)."""

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Stream(StrEnum):
    """The streams of one run."""

    CONTROL = "control"
    TELEMETRY = "telemetry"
    DEADLETTER = "deadletter"


class LedgerKey(StrEnum):
    """The keys of one run's data ledger (suffixes under ``pilot:<run>:ledger:``)."""

    META = "meta"
    UNITS = "units"
    ORDER = "order"
    PENDING = "pending"
    LEASES = "leases"
    OWNER = "owner"
    CURSOR = "cursor"
    DONE = "done"
    TOKENS_BY_TRAINER = "tokens:trainer"
    TOKENS_BY_ROUND = "tokens:round"
    RECEIPTS = "receipts"


class EvalKey(StrEnum):
    """The keys of one run's evaluation results (suffixes under ``pilot:<run>:eval:``)."""

    RESULTS = "results"
    FAILED = "failed"


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is safe inside a key name, else raise ConfigError."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ConfigError(
            f"invalid run id {run_id!r}: use 1-64 characters from [A-Za-z0-9._-], starting with a letter or digit"
        )
    return run_id


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}:{check_run_id(run_id)}"


def stream(run_id: str, which: Stream | str) -> str:
    """Key of one of a run's streams (``which`` is a :class:`Stream` or its value)."""
    return f"{run_prefix(run_id)}:stream:{Stream(which).value}"


def ledger(run_id: str, which: LedgerKey) -> str:
    """Key of one of a run's ledger structures."""
    return f"{run_prefix(run_id)}:ledger:{LedgerKey(which).value}"


def evaluation(run_id: str, which: EvalKey) -> str:
    """Key of one of a run's evaluation-result hashes."""
    return f"{run_prefix(run_id)}:eval:{EvalKey(which).value}"


def tokenizer_job(job_id: str) -> str:
    """Key of one tokenizer training job's status hash (``job_id`` as :func:`check_run_id` allows)."""
    if not isinstance(job_id, str) or not _RUN_ID_RE.match(job_id):
        raise ConfigError(f"invalid tokenizer job id {job_id!r}: use 1-64 characters from [A-Za-z0-9._-]")
    return f"{TOKENIZER_JOB_PREFIX}{job_id}"


def ledger_keys(run_id: str) -> dict[LedgerKey, str]:
    """All ledger keys of a run, by role (the order Lua scripts receive them in)."""
    return {k: ledger(run_id, k) for k in LedgerKey}


def run_keys(run_id: str) -> list[str]:
    """Every key a run owns (for cleanup: DEL these, then ZREM the run from RUNS)."""
    return (
        [stream(run_id, s) for s in Stream]
        + list(ledger_keys(run_id).values())
        + [evaluation(run_id, k) for k in EvalKey]
    )
