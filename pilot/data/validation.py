"""Validation batches: the whole validation split, or a seeded sample of it.

The validation shard's documents become one token stream (``[BOS] + tokens``
per document, as in training) cut into rows of ``seq_len`` targets: row k has
inputs ``stream[kT : kT+T]`` and targets ``stream[kT+1 : kT+T+1]``, so every
token after the first is a target exactly once. The final row is padded
(inputs with BOS, targets with ``IGNORE_INDEX``).

With ``max_tokens`` smaller than the split, a deterministic random sample of
``ceil(max_tokens / T)`` full rows is drawn (without replacement, seeded, then
kept in stream order), so every evaluation of a run scores the same text and the
sample is spread over the whole split rather than its first pages.
``num_tokens`` states how many targets the batches cover; ``split_tokens`` how
many the whole split has.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pilot.data.loader import DEFAULT_TOKENIZER_BATCH, IGNORE_INDEX, tokenize_documents
from pilot.data.shards import read_shard_texts
from pilot.errors import DataError
from pilot.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch


class ValidationSet:
    """Batches of (inputs, targets) over validation rows; iterate it, or ``iter_batches(rank, world)``."""

    def __init__(
        self, stream: np.ndarray, row_starts: np.ndarray, batch_size: int, seq_len: int, *, bos_id: int
    ) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len
        self.row_starts = row_starts
        self.split_tokens = len(stream) - 1
        tail = seq_len + 1
        self._inputs = np.concatenate([stream, np.full(tail, bos_id, dtype=np.int64)])
        self._targets = np.concatenate([stream[1:], np.full(tail + 1, IGNORE_INDEX, dtype=np.int64)])
        self.num_tokens = int(np.minimum(seq_len, self.split_tokens - row_starts).sum())

    @property
    def sampled(self) -> bool:
        """True when the batches cover a sample, not the whole split."""
        return self.num_tokens < self.split_tokens

    def __len__(self) -> int:
        return math.ceil(len(self.row_starts) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_batches()

    def iter_batches(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``rank, rank+world_size, …`` (DDP evaluation: sum the ranks' losses)."""
        import torch

        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not valid for world_size {world_size}")
        columns = np.arange(self.seq_len)
        for index in range(rank, len(self), world_size):
            starts = self.row_starts[index * self.batch_size : (index + 1) * self.batch_size]
            positions = starts[:, None] + columns[None, :]
            yield torch.from_numpy(self._inputs[positions]), torch.from_numpy(self._targets[positions])


def validation_batches(
    val_shard: str | Path,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    seed: int = 0,
    tokenizer_batch: int = DEFAULT_TOKENIZER_BATCH,
) -> ValidationSet:
    """The validation split of ``val_shard`` as batches (whole, or a sample of ``max_tokens``)."""
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be >= 1, got {max_tokens}")
    path = Path(val_shard)
    texts = read_shard_texts(path)
    arrays = [tokens for _, tokens in tokenize_documents(enumerate(texts), tokenizer, tokenizer_batch)]
    stream = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
    targets = len(stream) - 1
    if targets < 1:
        raise DataError(f"validation shard {path} holds no text to evaluate on")
    all_rows = math.ceil(targets / seq_len)
    wanted = all_rows if max_tokens is None else math.ceil(max_tokens / seq_len)
    if wanted >= all_rows:
        starts = np.arange(all_rows, dtype=np.int64) * seq_len
    else:
        full_rows = targets // seq_len  # wanted < all_rows <= full_rows + 1, so wanted <= full_rows
        chosen = np.random.default_rng(seed).choice(full_rows, size=wanted, replace=False)
        starts = np.sort(chosen).astype(np.int64) * seq_len
    return ValidationSet(stream, starts, batch_size, seq_len, bos_id=tokenizer.bos_id)
