"""Bits-per-byte evaluation: exact values on fake models, exclusions, modes, and DDP sums."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pilot.errors import DataError
from pilot.evaluate import BPBResult, bpb_from_losses, evaluate_bpb

REPO_ROOT = Path(__file__).resolve().parents[2]


class TableModel(nn.Module):
    """A bigram-style fake GPT: logits[b, t] = table[inputs[b, t]].

    ``table=None`` gives all-zero logits (a uniform model). ``oracle=True``
    cheats by putting a huge logit on the target, i.e. a perfect predictor.
    Records the mode and grad state it was called in.
    """

    def __init__(self, vocab: int, table: torch.Tensor | None = None, *, oracle: bool = False, flat: bool = True):
        super().__init__()
        self.vocab = vocab
        self.table = nn.Parameter(table if table is not None else torch.zeros(vocab, vocab))
        self.oracle = oracle
        self.flat = flat
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) per call

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_reduction: str = "mean") -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        logits = self.table[inputs]
        if self.oracle:
            logits = 100.0 * F.one_hot(targets.clamp(min=0), self.vocab).float()
        losses = F.cross_entropy(
            logits.reshape(-1, self.vocab), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return losses if self.flat else losses.reshape(targets.shape)


def make_batches(vocab: int, count: int, *, seed: int = 0, batch: int = 4, seq: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def random_table(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))


def mixed_token_bytes(vocab: int) -> torch.Tensor:
    """Byte lengths 0 (special), 1 and 2, fixed by seed."""
    return torch.randint(0, 3, (vocab,), generator=torch.Generator().manual_seed(5))


def test_uniform_model_over_bytes_scores_exactly_8_bits() -> None:
    model = TableModel(256)
    result = evaluate_bpb(model, make_batches(256, 3), torch.ones(256, dtype=torch.int64), device="cpu")
    assert result.bpb == pytest.approx(8.0, abs=1e-6)
    assert result.tokens == result.bytes == 3 * 4 * 16
    assert result.loss_per_token == pytest.approx(math.log(256), abs=1e-6)


def test_perfect_model_scores_about_zero() -> None:
    result = evaluate_bpb(TableModel(256, oracle=True), make_batches(256, 2), torch.ones(256, dtype=torch.int64), device="cpu")
    assert 0.0 <= result.bpb < 1e-6


def test_two_byte_tokens_halve_bpb() -> None:
    batches = make_batches(256, 2)
    one = evaluate_bpb(TableModel(256, random_table(256)), batches, torch.ones(256, dtype=torch.int64), device="cpu")
    two = evaluate_bpb(TableModel(256, random_table(256)), batches, torch.full((256,), 2), device="cpu")
    assert two.nats == pytest.approx(one.nats)
    assert two.bytes == 2 * one.bytes
    assert two.bpb == pytest.approx(one.bpb / 2, rel=1e-9)


def test_special_and_ignored_targets_are_excluded_from_both_sums() -> None:
    vocab, special = 257, 256  # 256 byte tokens + one 0-byte special token
    token_bytes = torch.ones(vocab, dtype=torch.int64)
    token_bytes[special] = 0
    inputs = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    targets = inputs.roll(-1, dims=1).clone()
    targets[0, :3] = special
    targets[1, 5:] = -1
    counted = 16 - 3 - 3
    result = evaluate_bpb(TableModel(vocab), [(inputs, targets)], token_bytes, device="cpu")
    assert result.tokens == result.bytes == counted
    assert result.nats == pytest.approx(counted * math.log(vocab), rel=1e-9)
    assert result.bpb == pytest.approx(math.log2(vocab), rel=1e-9)


def test_variable_token_lengths_weight_the_denominator() -> None:
    token_bytes = torch.tensor([1, 3, 0, 2])
    losses = torch.tensor([0.5, 1.0, 9.0, 2.0])
    targets = torch.tensor([0, 1, 2, 3])
    result = bpb_from_losses(losses, targets, token_bytes)
    assert result.bytes == 6 and result.tokens == 3
    assert result.bpb == pytest.approx(3.5 / (math.log(2) * 6))


def test_runs_in_eval_mode_without_grad_and_restores_train_mode() -> None:
    model = TableModel(256, random_table(256))
    model.train()
    evaluate_bpb(model, make_batches(256, 2), torch.ones(256, dtype=torch.int64), device="cpu")
    assert model.calls == [(False, False), (False, False)]
    assert model.training
    model.eval()
    evaluate_bpb(model, make_batches(256, 1), torch.ones(256, dtype=torch.int64), device="cpu")
    assert not model.training


def test_accepts_batch_by_time_losses_and_respects_max_batches() -> None:
    batches = make_batches(256, 4)
    table = random_table(256)
    flat = evaluate_bpb(TableModel(256, table), batches[:2], torch.ones(256, dtype=torch.int64), device="cpu")
    shaped_model = TableModel(256, table, flat=False)
    shaped = evaluate_bpb(shaped_model, batches, torch.ones(256, dtype=torch.int64), device="cpu", max_batches=2)
    assert len(shaped_model.calls) == 2
    assert shaped == flat


def test_autocast_bf16_stays_close_to_fp32() -> None:
    batches, table = make_batches(256, 2), random_table(256)
    exact = evaluate_bpb(TableModel(256, table), batches, torch.ones(256, dtype=torch.int64), device="cpu")
    mixed = evaluate_bpb(
        TableModel(256, table), batches, torch.ones(256, dtype=torch.int64), device="cpu", autocast_dtype=torch.bfloat16
    )
    assert mixed.bpb == pytest.approx(exact.bpb, rel=2e-2)


@pytest.mark.parametrize(
    ("targets", "token_bytes", "message"),
    [
        (torch.full((1, 4), 2), torch.tensor([1, 1, 0]), "no target bytes"),
        (torch.full((1, 4), -1), torch.ones(3, dtype=torch.int64), "no target bytes"),
        (torch.tensor([[0, 1, 7, 2]]), torch.ones(3, dtype=torch.int64), "out of range"),
        (torch.zeros(1, 4, dtype=torch.int64), torch.ones(3), "integers"),
    ],
)
def test_bad_inputs_raise_data_error(targets: torch.Tensor, token_bytes: torch.Tensor, message: str) -> None:
    with pytest.raises(DataError, match=message):
        evaluate_bpb(TableModel(8), [(torch.zeros_like(targets).clamp(min=0), targets)], token_bytes, device="cpu")


def test_reduced_loss_is_refused() -> None:
    class MeanModel(TableModel):
        def forward(self, inputs, targets, loss_reduction="mean"):  # type: ignore[override]
            return super().forward(inputs, targets, "mean")

    with pytest.raises(DataError, match="loss_reduction='none'"):
        evaluate_bpb(MeanModel(256), make_batches(256, 1), torch.ones(256, dtype=torch.int64), device="cpu")


_WORKER = """
import json, os, torch, torch.distributed as dist
from tests.unit.test_evaluate import TableModel, make_batches, mixed_token_bytes, random_table
from pilot.evaluate import evaluate_bpb
dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=1, world_size=2)
shard = make_batches(64, 4)[1::2]
result = evaluate_bpb(TableModel(64, random_table(64)), shard, mixed_token_bytes(64), device="cpu")
print(json.dumps(result.as_dict()))
dist.destroy_process_group()
"""


def test_distributed_ranks_agree_on_the_global_sums() -> None:
    """Rank 1 runs in a subprocess, rank 0 here (one torch import instead of two)."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "INIT": init, "PYTHONPATH": str(REPO_ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    token_bytes = mixed_token_bytes(64)
    batches = make_batches(64, 4)
    try:
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=2, timeout=timedelta(seconds=60))
        try:
            rank0 = evaluate_bpb(TableModel(64, random_table(64)), batches[0::2], token_bytes, device="cpu")
        finally:
            dist.destroy_process_group()
        out, err = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    rank1 = BPBResult(**json.loads(out.strip().splitlines()[-1]))
    single = evaluate_bpb(TableModel(64, random_table(64)), batches, token_bytes, device="cpu")
    assert rank0 == rank1
    assert rank0.bytes == single.bytes and rank0.tokens == single.tokens
    assert rank0.bpb == pytest.approx(single.bpb, rel=1e-9)
