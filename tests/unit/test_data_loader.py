"""TokenLoader (order, cursor resume, DDP), work-unit batches and validation batches."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pilot.data import (
    IGNORE_INDEX,
    LoaderCursor,
    TokenLoader,
    count_unit_tokens,
    import_text,
    iter_unit_batches,
    list_shards,
    resolve_unit,
    validation_batches,
    work_units,
)
from pilot.data.shards import shard_name, write_shard
from pilot.errors import DataError
from pilot.tokenizer import ByteTokenizer, CharTokenizer

B, T = 2, 16
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """Three training shards (2 row groups of 4 docs, 1 to 120 chars each) + a validation shard."""
    rng = random.Random(7)
    directory = tmp_path_factory.mktemp("loader")
    shards: list[list[str]] = []
    for index in range(4):
        docs = ["".join(rng.choice("abcdefgh é\n") for _ in range(rng.randint(1, 120))) for _ in range(8)]
        write_shard(directory / shard_name(index), docs, docs_per_row_group=4)
        shards.append(docs)
    return directory, shards[:3]


def _stream(docs: list[str]) -> list[int]:
    return [t for doc in docs for t in [TOK.bos_id, *TOK.encode(doc)]]


def _flat(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[int], list[int]]:
    return batch[0].flatten().tolist(), batch[1].flatten().tolist()


def test_batches_are_the_document_stream(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, shards = dataset
    stream = _stream([d for shard in shards for d in shard])
    loader = TokenLoader(directory, TOK, B, T, epochs=1)
    batches = list(loader)
    n = B * T
    assert len(batches) == (len(stream) - 1) // n  # nothing but the final partial window is left out
    for i, (inputs, targets) in enumerate(batches):
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == torch.int64
        assert inputs.flatten().tolist() == stream[i * n : i * n + n]
        assert targets.flatten().tolist() == stream[i * n + 1 : i * n + n + 1]


def test_same_seed_same_batches_other_seed_other_order(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, _ = dataset

    def take(seed: int | None, count: int = 40) -> list[list[int]]:
        loader = TokenLoader(directory, TOK, B, T, seed=seed)
        return [_flat(next(loader))[0] for _ in range(count)]

    assert take(3) == take(3)
    assert take(3) != take(4)
    assert take(None) != take(3)


@pytest.mark.parametrize("seed", [None, 5])
def test_cursor_resume_matches_uninterrupted_run(dataset: tuple[Path, list[list[str]]], seed: int | None) -> None:
    directory, _ = dataset
    full = TokenLoader(directory, TOK, B, T, seed=seed)
    cursors: list[LoaderCursor] = []
    batches: list[tuple[list[int], list[int]]] = []
    for _ in range(110):  # past the end of epoch 0 (~40 batches per epoch)
        cursors.append(full.cursor)
        batches.append(_flat(next(full)))
    for k in range(105):
        saved = LoaderCursor.from_dict(cursors[k].to_dict())  # as stored in checkpoint metadata
        resumed = TokenLoader(directory, TOK, B, T, seed=seed, cursor=saved)
        assert [_flat(next(resumed)) for _ in range(5)] == batches[k : k + 5], f"resume at batch {k} from {saved}"
    # the resume points above cover the interesting cases
    assert any(c.token_offset > 0 for c in cursors), "mid-document"
    assert len({(c.shard_index, c.row_group) for c in cursors}) == 6, "every row group and shard boundary"
    assert {c.epoch for c in cursors} >= {0, 1, 2}, "across epochs"


def test_resume_with_other_batch_shape_continues_the_stream(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, shards = dataset
    stream = _stream([d for shard in shards for d in shard])
    loader = TokenLoader(directory, TOK, B, T)
    for _ in range(3):
        next(loader)
    resumed = TokenLoader(directory, TOK, 1, 8, cursor=loader.cursor)
    start = 3 * B * T
    assert _flat(next(resumed))[0] == stream[start : start + 8]


def test_ddp_ranks_interleave_disjoint_batches(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, _ = dataset
    single = TokenLoader(directory, TOK, B, T)
    reference = [_flat(next(single)) for _ in range(20)]
    ranks = [TokenLoader(directory, TOK, B, T, rank=r, world_size=3) for r in range(3)]
    for step in range(6):
        got = [_flat(next(loader)) for loader in ranks]
        assert got == reference[3 * step : 3 * step + 3]  # rank r takes the r-th batch of each step
        assert len({c for c in (loader.cursor for loader in ranks)}) == 1  # one shared cursor
    # a 3-rank run resumed on 2 ranks continues from the same global position
    resumed = [TokenLoader(directory, TOK, B, T, rank=r, world_size=2, cursor=ranks[0].cursor) for r in range(2)]
    assert [_flat(next(loader)) for loader in resumed] == reference[18:20]


def test_bad_cursor_and_arguments_are_refused(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, _ = dataset
    with pytest.raises(DataError, match="shard 9 row group 0"):
        TokenLoader(directory, TOK, B, T, cursor=LoaderCursor(shard_index=9))
    with pytest.raises(DataError, match="row 4 is past the end"):
        TokenLoader(directory, TOK, B, T, cursor=LoaderCursor(row_offset=4))
    with pytest.raises(DataError, match="token offset 999"):
        next(TokenLoader(directory, TOK, B, T, cursor=LoaderCursor(token_offset=999)))
    with pytest.raises(DataError, match="unknown keys"):
        LoaderCursor.from_dict({"shard": 1})
    with pytest.raises(DataError, match="'epoch'"):
        LoaderCursor.from_dict({**LoaderCursor().to_dict(), "epoch": -1})
    with pytest.raises(DataError, match="rank 2"):
        TokenLoader(directory, TOK, B, T, rank=2, world_size=2)


def test_unit_batches_cover_the_row_group_exactly(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, shards = dataset
    train, _ = list_shards(directory)
    unit = work_units(train)[3]  # shard 1, row group 1
    assert unit.key == "shard_00001.parquet:1" and resolve_unit(directory, unit.key) == (unit.path, 1)
    with pytest.raises(DataError, match="only 2 row groups"):
        resolve_unit(directory, "shard_00001.parquet:2")
    with pytest.raises(DataError, match="not of the form"):
        resolve_unit(directory, "shard_00001.parquet")
    stream = _stream(shards[1][4:8])
    assert count_unit_tokens(unit.path, unit.row_group, TOK) == len(stream) - 1
    batches = list(iter_unit_batches(unit.path, unit.row_group, TOK, 1, 8))
    targets = [t for b in batches for t in b.targets.flatten().tolist() if t != IGNORE_INDEX]
    assert targets == stream[1:]  # every token after the first, exactly once
    assert sum(b.num_tokens for b in batches) == len(stream) - 1
    assert [b.last for b in batches] == [False] * (len(batches) - 1) + [True]
    assert batches[-1].inputs.flatten().tolist()[batches[-1].num_tokens :] == [TOK.bos_id] * (
        8 - batches[-1].num_tokens
    )
    # resume a half-done unit from a recorded next_offset
    middle = batches[4]
    resumed = list(iter_unit_batches(unit.path, unit.row_group, TOK, 1, 8, start_offset=middle.next_offset))
    assert [b.targets.tolist() for b in resumed] == [b.targets.tolist() for b in batches[5:]]


def test_unit_batches_ddp_ranks_split_and_stay_in_step(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, _ = dataset
    unit = work_units(list_shards(directory)[0])[0]
    single = list(iter_unit_batches(unit.path, unit.row_group, TOK, 2, 8))
    ranks = [list(iter_unit_batches(unit.path, unit.row_group, TOK, 2, 8, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (len(single) + 1) // 2
    interleaved = [b for pair in zip(*ranks, strict=True) for b in pair]
    for mine, ref in zip(interleaved, single, strict=False):
        assert torch.equal(mine.targets, ref.targets) and mine.num_tokens == ref.num_tokens
    assert sum(b.num_tokens for r in ranks for b in r) == sum(b.num_tokens for b in single)


def test_validation_whole_split_and_sample(dataset: tuple[Path, list[list[str]]]) -> None:
    directory, _ = dataset
    _, val = list_shards(directory)
    import pyarrow.parquet as pq

    stream = _stream(pq.read_table(val).column("text").to_pylist())
    whole = validation_batches(val, TOK, 3, 16)
    assert whole.num_tokens == whole.split_tokens == len(stream) - 1 and not whole.sampled
    targets = [t for _, y in whole for t in y.flatten().tolist() if t != IGNORE_INDEX]
    assert targets == stream[1:]
    sample = validation_batches(val, TOK, 3, 16, max_tokens=100, seed=1)
    assert sample.num_tokens == 112 and sample.sampled  # ceil(100 / 16) full rows
    rows = [row for x, _ in sample for row in x.tolist()]
    assert len(rows) == 7 and np.all(np.diff(sample.row_starts) > 0)  # distinct rows, in stream order
    assert all(row == stream[s : s + 16] for row, s in zip(rows, sample.row_starts.tolist(), strict=True))
    again = validation_batches(val, TOK, 3, 16, max_tokens=100, seed=1)
    other = validation_batches(val, TOK, 3, 16, max_tokens=100, seed=2)
    assert again.row_starts.tolist() == sample.row_starts.tolist() != other.row_starts.tolist()
    halves = [list(sample.iter_batches(rank=r, world_size=2)) for r in range(2)]
    assert len(halves[0]) + len(halves[1]) == len(sample)


def test_shakespeare_char_pipeline(shakespeare_path: Path, tmp_path: Path) -> None:
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    import_text([shakespeare_path], tmp_path)
    loader = TokenLoader(tmp_path, tok, 8, 64)
    inputs, targets = next(loader)
    assert inputs[0, 0].item() == tok.bos_id and tok.decode(inputs[0, 1:].tolist()) == text[:63]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    val = validation_batches(list_shards(tmp_path)[1], tok, 16, 256, max_tokens=20_000)
    assert val.num_tokens == 79 * 256 and val.split_tokens > 100_000
