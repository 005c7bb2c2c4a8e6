"""Scoring one checkpoint: bits per byte on the validation split, and a text sample.

This is the one evaluation path. The Celery worker (``worker.py``), ``pilot eval``
and ``pilot sample`` all call it, so the number the worker stores is the number
``pilot eval`` prints for the same files and settings.

- :class:`EvalSettings`: validation data, tokenizer override, device, how many
  validation tokens (0 = the whole split), batch size, seeds, and the fixed
  sample prompt / length / temperature / top-k / seed. Validated on construction
  (a bad field raises ``ConfigError`` naming it).
- :class:`Evaluator`: resolves the validation data once (a missing path fails at
  construction, naming it) and caches tokenizers and tokenized validation sets
  between checkpoints, since a worker scores every round of a run on the same
  split. ``evaluate(uri, expected_sha256=..., expected_round=...)`` returns an
  :class:`EvalOutcome`; ``load`` and ``sample`` are the pieces.
- :func:`evaluate_checkpoint`: the one-shot form (CLI).
- :func:`run_eval_settings`: how a federated run's checkpoints are scored (its
  ``eval-tokens``, and its task's sample: for ``shakespeare`` the Flower NanoGPT
  example's 200 characters after a newline, temperature 0.8, top-k 40), the same
  whether the Celery worker or the coordinator (``eval-inline``) scores them.

Checks, each failure a permanent ``CheckpointError`` / ``TokenizerError`` that
names the file (the worker records it as a failed evaluation, never retries it):

1. the checkpoint directory and its ``checkpoint.json`` sidecar exist and parse;
2. the sidecar's sha256 equals the job's (the sidecar lists every tensor file's
   sha256, so this pins the whole checkpoint), and its round equals the job's;
3. the stored model config builds a ``GPTConfig`` whose vocabulary holds the tokenizer's;
4. the tokenizer (``--tokenizer``, else ``<run_dir>/tokenizer`` beside the
   checkpoints folder, else the built-in tokenizer the checkpoint names) has the
   sha256 the checkpoint records;
5. ``load_checkpoint`` verifies the model tensor file's size and sha256, and the
   weights must fit the config.

Validation rows are ``seq_len`` targets long (default: the model's context), in
batches of ``batch_tokens // seq_len`` rows. With ``eval_tokens`` > 0 a seeded
sample of rows is scored: the same rows for every checkpoint, so rounds compare.
The loss is the mean cross-entropy (nats) per scored target (perplexity =
exp(loss)); with ``eval_tokens=0`` the rows are non-overlapping ``seq_len``
windows covering the whole split, every target scored once. The sample is
``[BOS] + prompt`` continued by ``GPT.generate`` with a fixed temperature, top-k
and seed: deterministic for given weights on a given device.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pilot.checkpoint import (
    SIDECAR_NAME,
    CheckpointMeta,
    checkpoint_dir_of,
    load_checkpoint,
    read_checkpoint_meta,
)
from pilot.data import ValidationSet, list_shards, resolve_data, validation_batches
from pilot.errors import CheckpointError, ConfigError, TokenizerError
from pilot.evaluate import BPBResult, evaluate_bpb
from pilot.hashing import sha256_file
from pilot.log import get_logger
from pilot.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    import torch

    from pilot.model import GPT, GPTConfig
    from pilot.run_config import RunConfig

log = get_logger(__name__)

RUN_TOKENIZER_SUBDIR = "tokenizer"
"""Where a run keeps the tokenizer artifact it trained with: ``<run_dir>/tokenizer``."""
BUILTIN_TOKENIZERS = ("byte",)
"""Tokenizers that need no artifact, used when a checkpoint names one and no artifact is found."""
DEFAULT_PROMPT = "The "
_VALIDATION_CACHE = 4


@dataclass(frozen=True)
class EvalSettings:
    """How to score checkpoints (the worker's config; ``pilot eval`` / ``pilot sample`` flags)."""

    data: Path | None = None  # validation data: shard dir or text file (resolve_data); None = sampling only
    tokenizer: Path | None = None  # artifact; None = <run_dir>/tokenizer of each checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # torch CPU threads (process-wide); None = torch's default
    dtype: str = "auto"  # autocast: auto (bf16 on CUDA) | float32 | bfloat16
    eval_tokens: int = 65_536  # validation targets to score (a seeded sample); 0 = the whole split
    seq_len: int | None = None  # targets per row; None = the model's sequence_len
    batch_tokens: int = 16_384  # tokens per forward pass (rows per batch = batch_tokens // seq_len, >= 1)
    eval_seed: int = 1337  # seed of the validation sample (pilot train's default: same rows)
    prompt: str = DEFAULT_PROMPT  # the fixed sample prompt (BOS is prepended)
    sample_tokens: int = 64  # tokens to generate; 0 = no sample
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50  # None = the whole vocabulary
    sample_seed: int = 42

    def __post_init__(self) -> None:
        for name, low in _INT_LIMITS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                flag = name.replace("_", "-")
                raise ConfigError(f"evaluator setting {flag} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"evaluator setting temperature must be >= 0, got {self.temperature!r}")


TASK_SAMPLES: dict[str, dict[str, Any]] = {
    "shakespeare": {"prompt": "\n", "sample_tokens": 200, "temperature": 0.8, "top_k": 40},
}
"""A task's text sample (EvalSettings fields); tasks not listed use EvalSettings' defaults."""


def run_eval_settings(cfg: RunConfig, data: Path, **overrides: Any) -> EvalSettings:
    """The settings that score a federated run's checkpoints on ``data`` (its shard directory)."""
    values: dict[str, Any] = {"data": data, "device": "cpu" if cfg.device == "cpu" else "auto",
                              "eval_tokens": cfg.eval_tokens, **TASK_SAMPLES.get(cfg.task, {}), **overrides}
    return EvalSettings(**values)


_INT_LIMITS = {"eval_tokens": 0, "batch_tokens": 1, "sample_tokens": 0, "eval_seed": 0, "sample_seed": 0,
               "threads": 1, "seq_len": 1, "top_k": 1}
"""The smallest value of each integer setting."""
_OPTIONAL = ("threads", "seq_len", "top_k")


@dataclass(frozen=True)
class EvalOutcome:
    """What scoring one checkpoint found."""

    checkpoint: str  # the checkpoint directory
    round: int | None  # from the sidecar
    tokens_seen: int  # training tokens up to this checkpoint (sidecar)
    checkpoint_sha256: str  # sha256 of checkpoint.json
    bpb: float
    tokens: int  # validation targets scored
    split_tokens: int  # targets in the whole validation split
    sampled: bool  # True: a seeded sample of the split; False: the whole split
    bytes: int  # UTF-8 bytes of the scored targets
    loss_per_token: float  # nats
    seq_len: int
    sample: str  # generated continuation of the prompt ("" when sample_tokens is 0)
    prompt: str
    eval_s: float  # wall seconds: loading, scoring and sampling
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint turned into a model on the evaluator's device."""

    path: Path
    meta: CheckpointMeta
    sha256: str  # of the sidecar
    model: GPT
    tokenizer: Tokenizer


def checkpoint_path(uri: str | Path) -> Path:
    """The local directory a checkpoint URI names (a path, its sidecar, or a ``file://`` URL)."""
    text = str(uri)
    if not text:
        raise CheckpointError("empty checkpoint URI")
    parts = urlsplit(text)
    if parts.scheme == "file":
        text = unquote(parts.path)
    elif parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        raise CheckpointError(f"unsupported checkpoint URI {text!r}: use a local path or a file:// URL")
    return checkpoint_dir_of(Path(text).expanduser())


def sidecar_sha256(directory: Path) -> str:
    """sha256 of a checkpoint's ``checkpoint.json`` (the digest jobs and events carry)."""
    return sha256_file(directory / SIDECAR_NAME)


def run_tokenizer_path(checkpoint_dir: Path) -> Path:
    """``<run_dir>/tokenizer`` for ``<run_dir>/checkpoints/round_N``."""
    return checkpoint_dir.parent.parent / RUN_TOKENIZER_SUBDIR


class Evaluator:
    """Scores checkpoints with one :class:`EvalSettings`; safe to share between threads."""

    def __init__(self, settings: EvalSettings) -> None:
        import torch

        from pilot.runtime import pick_device, resolve_dtype

        self.settings = settings
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)  # a CPU shared with trainers: fewer threads, no spin-waits
        self.device = pick_device(settings.device)
        self.autocast_dtype = resolve_dtype(settings.dtype, self.device)
        self.val_shard: Path | None = None
        if settings.data is not None:
            data_dir = resolve_data(settings.data)  # DataError naming the path when it does not exist
            _, self.val_shard = list_shards(data_dir)
        self._lock = threading.Lock()
        self._tokenizers: dict[tuple[str, int, int], Tokenizer] = {}
        self._validation: dict[tuple[Any, ...], ValidationSet] = {}

    # ------------------------------------------------------------------ loading

    def load(
        self, uri: str | Path, *, expected_sha256: str | None = None, expected_round: int | None = None
    ) -> LoadedCheckpoint:
        """Verify a checkpoint (see the module docstring) and build its model on the device."""
        from pilot.model import GPTConfig

        directory = checkpoint_path(uri)
        meta = read_checkpoint_meta(directory)  # CheckpointError: missing dir, no sidecar, bad JSON
        digest = sidecar_sha256(directory)
        if expected_sha256 and digest != expected_sha256:
            raise CheckpointError(
                f"checkpoint {directory} sha256 mismatch: {SIDECAR_NAME} has {digest}, the job expects "
                f"{expected_sha256} (rewritten or tampered with)"
            )
        if expected_round is not None and meta.round != expected_round:
            raise CheckpointError(
                f"checkpoint {directory} is of round {meta.round}, the job is for round {expected_round}"
            )
        try:
            config = GPTConfig(**meta.model_config)
        except (TypeError, ConfigError) as exc:
            raise CheckpointError(f"checkpoint {directory} has an invalid model config: {exc}") from exc
        tokenizer = self.tokenizer_for(directory, meta)
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(
                f"checkpoint {directory} has vocab_size {config.vocab_size}, smaller than its tokenizer "
                f"{tokenizer.name}'s {tokenizer.vocab_size}"
            )
        checkpoint = load_checkpoint(
            directory, expect_model_config=config.to_dict(), device=self.device, groups=["model"]
        )
        model = self._model(config, checkpoint.model, directory)
        return LoadedCheckpoint(directory, meta, digest, model, tokenizer)

    def _model(self, config: GPTConfig, state: dict[str, torch.Tensor], directory: Path) -> GPT:
        """The model with the checkpoint's weights, built straight on the device (no init pass:
        ``assign=True`` makes the loaded tensors the parameters)."""
        import torch

        from pilot.model import GPT

        with torch.device(self.device):
            model = GPT(config)
        try:
            model.load_state_dict(state, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {directory} do not fit its model config: {exc}") from exc
        return model.eval()

    def tokenizer_for(self, directory: Path, meta: CheckpointMeta) -> Tokenizer:
        """The tokenizer to score ``directory`` with, checked against the sha256 its sidecar records."""
        identity = meta.tokenizer
        expected = identity.sha256 if identity else None
        spec: str | Path
        if self.settings.tokenizer is not None:
            spec = self.settings.tokenizer
            if not spec.exists():
                raise TokenizerError(f"tokenizer {spec} (--tokenizer) does not exist")
        elif (run_tokenizer := run_tokenizer_path(directory)).exists():
            spec = run_tokenizer
        elif identity is not None and identity.name in BUILTIN_TOKENIZERS:
            spec = identity.name
        else:
            raise TokenizerError(
                f"no tokenizer for checkpoint {directory}: {run_tokenizer} does not exist; pass --tokenizer PATH"
            )
        tokenizer = self._cached_tokenizer(spec)
        if expected is None:
            log.warning("checkpoint records no tokenizer; cannot verify it", checkpoint=str(directory))
        elif tokenizer.sha256 != expected:
            raise TokenizerError(
                f"tokenizer {spec} (sha256 {tokenizer.sha256}) is not the one checkpoint {directory} was trained "
                f"with ({identity.name if identity else '?'}, sha256 {expected})"
            )
        return tokenizer

    def _cached_tokenizer(self, spec: str | Path) -> Tokenizer:
        if isinstance(spec, Path):
            stat = spec.stat()
            key = (str(spec.resolve()), stat.st_mtime_ns, stat.st_size)
        else:
            key = (spec, 0, 0)
        with self._lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = load_tokenizer(spec)
            return self._tokenizers[key]

    # ------------------------------------------------------------------ scoring

    def validation(self, tokenizer: Tokenizer, seq_len: int) -> ValidationSet:
        """The validation batches for this tokenizer and row length (cached)."""
        if self.val_shard is None:
            raise ConfigError("no validation data configured: pass --data DIR_OR_FILE")
        settings = self.settings
        batch_size = max(1, settings.batch_tokens // seq_len)
        stat = self.val_shard.stat()
        key = (str(self.val_shard), stat.st_mtime_ns, tokenizer.sha256, seq_len, batch_size, settings.eval_tokens,
               settings.eval_seed)
        with self._lock:
            if key not in self._validation:
                if len(self._validation) >= _VALIDATION_CACHE:
                    self._validation.pop(next(iter(self._validation)))
                self._validation[key] = validation_batches(
                    self.val_shard, tokenizer, batch_size, seq_len,
                    max_tokens=settings.eval_tokens or None, seed=settings.eval_seed,
                )
            return self._validation[key]

    def seq_len_for(self, config: GPTConfig) -> int:
        seq_len = self.settings.seq_len or config.sequence_len
        if seq_len > config.sequence_len:
            raise ConfigError(f"seq-len {seq_len} exceeds the model's context ({config.sequence_len})")
        return seq_len

    def bpb(self, loaded: LoadedCheckpoint) -> tuple[BPBResult, ValidationSet]:
        """Bits per byte of the loaded model on the validation rows."""
        val = self.validation(loaded.tokenizer, self.seq_len_for(loaded.model.config))
        result = evaluate_bpb(
            loaded.model, val, loaded.tokenizer.token_bytes(), device=self.device, autocast_dtype=self.autocast_dtype
        )
        return result, val

    def sample(
        self,
        loaded: LoadedCheckpoint,
        *,
        prompt: str | None = None,
        tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> str:
        """Continue ``[BOS] + prompt`` (settings' values for anything not given); returns the new text."""
        settings = self.settings
        count = settings.sample_tokens if tokens is None else tokens
        if count == 0:
            return ""
        text = settings.prompt if prompt is None else prompt
        prompt_ids = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode(text)]
        new_ids = loaded.model.generate(
            prompt_ids,
            count,
            temperature=settings.temperature if temperature is None else temperature,
            top_k=settings.top_k if top_k is None else top_k,
            seed=settings.sample_seed if seed is None else seed,
        )
        return loaded.tokenizer.decode(new_ids)

    def evaluate(
        self, uri: str | Path, *, expected_sha256: str | None = None, expected_round: int | None = None
    ) -> EvalOutcome:
        """Verify, load, score and sample one checkpoint."""
        started = time.perf_counter()
        loaded = self.load(uri, expected_sha256=expected_sha256, expected_round=expected_round)
        try:
            result, val = self.bpb(loaded)
            sample = self.sample(loaded)
        finally:
            self._release(loaded)
        outcome = EvalOutcome(
            checkpoint=str(loaded.path),
            round=loaded.meta.round,
            tokens_seen=loaded.meta.tokens_seen,
            checkpoint_sha256=loaded.sha256,
            bpb=result.bpb,
            tokens=val.num_tokens,
            split_tokens=val.split_tokens,
            sampled=val.sampled,
            bytes=result.bytes,
            loss_per_token=result.loss_per_token,
            seq_len=val.seq_len,
            sample=sample,
            prompt=self.settings.prompt,
            eval_s=time.perf_counter() - started,
            device=str(self.device),
        )
        log.info("checkpoint evaluated", checkpoint=outcome.checkpoint, round=outcome.round, bpb=round(outcome.bpb, 6),
                 tokens=outcome.tokens, sampled=outcome.sampled, seconds=round(outcome.eval_s, 2))
        return outcome

    def _release(self, loaded: LoadedCheckpoint) -> None:
        """Give a scored model's device memory back (long-lived workers on a GPU)."""
        if self.device.type == "cuda":
            import torch

            loaded.model.to("meta")
            torch.cuda.empty_cache()


def evaluate_checkpoint(
    uri: str | Path, settings: EvalSettings, *, expected_sha256: str | None = None
) -> EvalOutcome:
    """Score one checkpoint with a fresh :class:`Evaluator` (``pilot eval``)."""
    return Evaluator(settings).evaluate(uri, expected_sha256=expected_sha256)

