"""Where a trainer's batches come from during a round.

A *feed* yields ``(inputs, targets)`` batches and settles its bookkeeping when
the round ends:

- :class:`UnitFeed` leases work units (row groups of the train shards) from the
  run's Redis ledger, one after another, keeping each unit's token offset so an
  interrupted unit resumes where it stopped and no data is trained twice within
  an epoch. Several trainers (or several ranks of one trainer) can share a
  ledger: a lease is exclusive.
- :class:`WindowFeed` draws random windows (nanoGPT's ``get_batch``, as the Flower
  NanoGPT example trains) from one contiguous token stream: this trainer's
  slice ``partition-id`` of ``num-partitions`` of the run's train text, or the
  whole of its node's ``data-path`` file (a partition ``pilot data split``
  wrote). Its generator is seeded by (seed, round, partition, rank), so DDP
  ranks of one trainer draw different windows and a rerun draws the same.

:func:`make_feed` picks one by the run's ``partition`` key (``ledger`` |
``contiguous``).

Every feed has the same surface: iterate for batches, ``renew()`` while training
(keeps leases alive), ``settle()`` once at the end (returns units completed),
``held`` (what it touched this round) and ``exhausted`` (no data left).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from pilot.data import iter_unit_batches
from pilot.data.shards import resolve_unit
from pilot.data.split import check_partition, partition_text, train_text
from pilot.errors import ConfigError, DataError
from pilot.ledger import Lease, Ledger
from pilot.log import get_logger
from pilot.run_config import RunConfig
from pilot.tokenizer import Tokenizer

if TYPE_CHECKING:
    from services.trainer.identity import TrainerIdentity


@dataclass
class HeldUnit:
    lease: Lease
    offset: int  # absolute token offset inside the unit reached so far
    tokens: int = 0  # targets trained in this unit this round
    done: bool = False
    settled: bool = False  # completed in the ledger already


log = get_logger(__name__)


class Feed(Protocol):
    held: list[HeldUnit]
    exhausted: bool

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def renew(self) -> None: ...

    def settle(self) -> int: ...

class UnitFeed:
    """Batches from leased work units, one unit after another, keeping each unit's position."""

    def __init__(self, ledger: Ledger, cfg: RunConfig, who: TrainerIdentity, tokenizer: Tokenizer, shard_dir: Path,
                 round: int):
        self.ledger, self.cfg, self.who, self.round = ledger, cfg, who, round
        self.tokenizer, self.shard_dir = tokenizer, shard_dir
        self.held: list[HeldUnit] = []
        self.exhausted = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            lease = self.ledger.lease(self.who.trainer_id, self.cfg.lease_seconds)
            if lease is None:
                # Units are normally completed when the round's reply goes out. When nothing is leasable
                # and this trainer holds finished units, complete them now: the epoch can then advance,
                # so a small dataset never ends a time-budgeted round early.
                finished = [unit for unit in self.held if unit.done and not unit.settled]
                if not finished:
                    self.exhausted = True
                    return
                for unit in finished:
                    self.ledger.complete(unit.lease, unit.tokens, self.round)
                    unit.settled = True
                continue
            unit = HeldUnit(lease=lease, offset=lease.offset)
            self.held.append(unit)
            shard, row_group = resolve_unit(self.shard_dir, lease.unit)
            for batch in iter_unit_batches(
                shard, row_group, self.tokenizer, self.cfg.batch_size, self.cfg.seq_len, start_offset=lease.offset
            ):
                unit.offset = batch.next_offset
                unit.tokens += batch.num_tokens
                if batch.num_tokens:
                    yield batch.inputs, batch.targets
            unit.done = True

    def renew(self) -> None:
        for unit in self.held:
            if not unit.settled:
                unit.lease = self.ledger.renew(unit.lease, self.cfg.lease_seconds)

    def settle(self) -> int:
        """Complete finished units, release the others at their offset; returns units completed this round."""
        for unit in self.held:
            if unit.settled:
                continue
            if unit.done:
                self.ledger.complete(unit.lease, unit.tokens, self.round)
            else:
                self.ledger.release_partial(unit.lease, unit.offset, unit.tokens, self.round)
            unit.settled = True
        return sum(1 for unit in self.held if unit.done)


class WindowFeed:
    """Random ``seq_len + 1`` windows of one token stream, ``batch_size`` per batch, never exhausted."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(f"this trainer's data holds {len(tokens)} tokens, fewer than seq-len + 1 = {seq_len + 1}")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.held: list[HeldUnit] = []  # nothing leased
        self.exhausted = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offsets = torch.arange(self.seq_len + 1)
        while True:
            starts = torch.randint(len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.generator)
            windows = self.tokens[starts[:, None] + offsets]
            yield windows[:, :-1], windows[:, 1:]

    def renew(self) -> None:
        pass

    def settle(self) -> int:
        return 0


def window_seed(seed: int, round: int, partition: int, rank: int) -> int:
    """One generator seed per (run seed, round, partition, DDP rank)."""
    return int(np.random.SeedSequence([seed, round, partition, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def contiguous_text(cfg: RunConfig, who: TrainerIdentity) -> tuple[str, int]:
    """This trainer's training text and partition id: its node's data-path file, else its slice of the run's."""
    if who.data_path is not None:
        path = who.data_path.expanduser()
        if not path.is_file():
            raise ConfigError(f"node-config data-path={str(who.data_path)!r} is not a text file: with "
                              "partition='contiguous' it names this node's partition (pilot data split writes them)")
        return path.read_text(encoding="utf-8"), who.partition_id or 0
    if who.partition_id is None and who.num_partitions is None:
        log.info("no partition-id/num-partitions in node-config: training as partition 0 of 1 (the whole train part)",
                 trainer=who.trainer_id)
        partition_id, num_partitions = 0, 1
    elif who.partition_id is None or who.num_partitions is None:
        raise ConfigError(f"node-config of {who.trainer_id} has partition-id={who.partition_id} and "
                          f"num-partitions={who.num_partitions}: give both or neither")
    else:
        partition_id, num_partitions = who.partition_id, who.num_partitions
    check_partition(partition_id, num_partitions)
    return partition_text(train_text(cfg.shard_dir()), num_partitions, partition_id), partition_id


def make_feed(ledger: Ledger, cfg: RunConfig, who: TrainerIdentity, tokenizer: Tokenizer, round: int, *,
              rank: int = 0) -> Feed:
    """The feed the run's ``partition`` key asks for (ledger units, or random windows of a contiguous slice)."""
    if cfg.partition == "ledger":
        return UnitFeed(ledger, cfg, who, tokenizer, cfg.shard_dir(who.data_path), round)
    text, partition_id = contiguous_text(cfg, who)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return WindowFeed(tokens, cfg.batch_size, cfg.seq_len, window_seed(cfg.seed, round, partition_id, rank))
