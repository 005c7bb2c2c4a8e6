"""Where a trainer's batches come from during a round.

A *feed* yields ``(inputs, targets)`` batches and settles its bookkeeping when
the round ends:

- :class:`UnitFeed` leases work units (row groups of the train shards) from the
  run's Redis ledger, one after another, keeping each unit's token offset so an
  interrupted unit resumes where it stopped and no data is trained twice within
  an epoch. Several trainers (or several ranks of one trainer) can share a
  ledger: a lease is exclusive.

Every feed has the same surface: iterate for batches, ``renew()`` while training
(keeps leases alive), ``settle()`` once at the end (returns units completed),
``held`` (what it touched this round) and ``exhausted`` (no data left).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pilot.data import iter_unit_batches
from pilot.data.shards import resolve_unit
from pilot.ledger import Lease, Ledger
from pilot.run_config import RunConfig
from pilot.tokenizer import Tokenizer

if TYPE_CHECKING:
    from services.trainer.local_round import TrainerIdentity


@dataclass
class HeldUnit:
    lease: Lease
    offset: int  # absolute token offset inside the unit reached so far
    tokens: int = 0  # targets trained in this unit this round
    done: bool = False
    settled: bool = False  # completed in the ledger already



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
