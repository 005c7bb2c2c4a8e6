"""The Tiny-Shakespeare task: its 90/10 character split, contiguous partitions, task defaults, window feed, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pilot.cli import app
from pilot.data import import_text, list_shards, split_text, train_text
from pilot.data.shards import read_shard_texts
from pilot.data.split import SPLIT_MANIFEST, VAL_FILE, partition_bounds, partition_text
from pilot.errors import ConfigError, DataError
from pilot.flower import app_run_config_defaults
from pilot.report.render import render_markdown
from pilot.report.summary import summarize
from pilot.run_config import TASK_DEFAULTS, run_config_from
from pilot.tokenizer import CharTokenizer
from services.trainer.feeds import WindowFeed, contiguous_text, make_feed, window_seed
from services.trainer.identity import TrainerIdentity

REPO = Path(__file__).resolve().parents[2]


# --- the split ------------------------------------------------------------------------------


def test_split_is_the_examples_first_90_percent_and_last_10(shakespeare_path: Path) -> None:
    text = shakespeare_path.read_text()
    train, val = split_text(text)
    assert len(text) == 1_115_394 and len(train) == int(0.9 * len(text)) == 1_003_854
    assert train + val == text and len(val) == 111_540
    assert len(set(text)) == 65 and CharTokenizer.from_text(text).vocab_size == 66  # 65 symbols + BOS


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_contiguous_partitions_cover_the_train_part_exactly_once(parts: int) -> None:
    train = "".join(chr(65 + i % 26) for i in range(10_007))
    bounds = [partition_bounds(len(train), parts, i) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(train)
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))  # no gap, no overlap
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    assert "".join(partition_text(train, parts, i) for i in range(parts)) == train


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(2, 2), (-1, 2), (0, 0)])
def test_a_partition_that_does_not_exist_is_refused_naming_the_key(partition_id: int, num_partitions: int) -> None:
    with pytest.raises(ConfigError, match="partition-id|num-partitions"):
        partition_bounds(100, num_partitions, partition_id)


def test_exact_split_import_keeps_the_train_text_and_one_validation_document(
    shakespeare_path: Path, tmp_path: Path
) -> None:
    text = shakespeare_path.read_text()[:60_000]
    source = tmp_path / "small.txt"
    source.write_text(text)
    import_text([source], tmp_path / "shards", exact_split=True)
    train, val = split_text(text)
    assert train_text(tmp_path / "shards") == train
    _, val_shard = list_shards(tmp_path / "shards")
    assert read_shard_texts(val_shard) == [val]


def test_pilot_data_split_writes_partitions_whose_concatenation_is_the_train_part(
    shakespeare_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "parts"
    result = CliRunner().invoke(app, ["data", "split", "--parts", "3", "--out", str(out), str(shakespeare_path)])
    assert result.exit_code == 0, result.output
    text = shakespeare_path.read_text()
    train, val = split_text(text)
    parts = sorted(out.glob("part_*.txt"))
    assert [p.name for p in parts] == ["part_00000.txt", "part_00001.txt", "part_00002.txt"]
    assert "".join(p.read_text() for p in parts) == train
    assert (out / VAL_FILE).read_text() == val
    manifest = json.loads((out / SPLIT_MANIFEST).read_text())
    assert manifest["train_chars"] == len(train) and manifest["parts"][2]["end"] == len(train)
    again = CliRunner().invoke(app, ["data", "split", "--parts", "3", "--out", str(out), str(shakespeare_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output  # never overwrites silently
    missing = CliRunner().invoke(app, ["data", "split", "--parts", "2", "--out", str(out), str(tmp_path / "no.txt")])
    assert missing.exit_code == 2 and "no.txt" in missing.output


def test_split_refuses_a_bad_fraction() -> None:
    with pytest.raises(DataError, match="val-fraction"):
        split_text("abcdef", 1.5)


# --- task defaults ----------------------------------------------------------------------------


def test_the_shakespeare_task_sets_the_examples_defaults() -> None:
    cfg = run_config_from({"task": "shakespeare"})
    assert (cfg.preset, cfg.tokenizer, cfg.seq_len, cfg.dropout, cfg.batch_size) == ("shakespeare-char", "char", 256,
                                                                                      0.2, 64)
    assert (cfg.optimizer, cfg.adamw_lr, cfg.rounds, cfg.round_steps) == ("adamw", 1e-3, 5, 50)
    assert (cfg.partition, cfg.eval_tokens, cfg.eval_inline, str(cfg.data)) == ("contiguous", 0, True, "shakespeare")
    plain = run_config_from({"data": "shakespeare"})
    assert (plain.task, plain.preset, plain.partition, plain.eval_inline, plain.round_steps) == (
        "pretrain", "d4", "ledger", False, 0)


def test_explicit_keys_override_the_task_defaults_also_under_flower() -> None:
    flower = app_run_config_defaults(REPO)  # what `flwr run .` passes: every key, unset ones with their marker
    cfg = run_config_from(flower, {"task": "shakespeare", "preset": "d1", "dropout": 0.0, "max-steps": 3,
                                   "num-server-rounds": 2, "learning-rate": 3e-4, "partition": "ledger"})
    assert (cfg.preset, cfg.dropout, cfg.round_steps, cfg.rounds, cfg.adamw_lr, cfg.partition) == (
        "d1", 0.0, 3, 2, 3e-4, "ledger")
    assert (cfg.tokenizer, cfg.batch_size, cfg.eval_tokens) == ("char", 64, 0)  # the rest: the task's
    assert run_config_from(flower, {"task": "shakespeare"}) == run_config_from({"task": "shakespeare"})
    # the resolved config travels to trainers as plain values and parses back to itself
    assert run_config_from(cfg.as_run_config()) == cfg


def test_every_task_default_key_is_a_run_config_key() -> None:
    from pilot.run_config import RunConfig

    for defaults in TASK_DEFAULTS.values():
        assert set(defaults) <= set(RunConfig.model_fields)


@pytest.mark.parametrize(("values", "key"), [({"task": "poetry"}, "task"), ({"partition": "random"}, "partition")])
def test_bad_task_values_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'.*allowed values"):
        run_config_from({"data": "shakespeare", **values})


# --- the contiguous feed ----------------------------------------------------------------------


def _who(**kwargs) -> TrainerIdentity:
    return TrainerIdentity(trainer_id="t", node_id=1, work_dir=Path("/nonexistent"), **kwargs)


def test_window_feed_draws_windows_of_its_own_tokens_seeded_by_rank() -> None:
    tokens = np.arange(1000, dtype=np.int64)
    feed = WindowFeed(tokens, batch_size=4, seq_len=16, seed=window_seed(1337, 1, 0, 0))
    inputs, targets = next(iter(feed))
    assert inputs.shape == targets.shape == (4, 16)
    assert (targets[:, :-1] == inputs[:, 1:]).all() and (targets - inputs == 1).all()  # shifted by one, contiguous
    assert int(targets.max()) < 1000
    same = next(iter(WindowFeed(tokens, 4, 16, window_seed(1337, 1, 0, 0))))[0]
    other_rank = next(iter(WindowFeed(tokens, 4, 16, window_seed(1337, 1, 0, 1))))[0]
    assert (same == inputs).all() and not (other_rank == inputs).all()
    assert window_seed(1337, 1, 0, 0) != window_seed(1337, 2, 0, 0) != window_seed(1337, 1, 1, 0)
    assert feed.settle() == 0 and feed.held == [] and not feed.exhausted
    with pytest.raises(DataError, match="seq-len"):
        WindowFeed(tokens[:10], 4, 16, 0)


def test_contiguous_text_is_this_trainers_slice(shakespeare_path: Path, tmp_path: Path) -> None:
    source = tmp_path / "small.txt"
    source.write_text(shakespeare_path.read_text()[:40_000])
    cfg = run_config_from({"task": "shakespeare", "data": str(source)})
    train, _ = split_text(source.read_text())
    first, _ = contiguous_text(cfg, _who(partition_id=0, num_partitions=2))
    second, pid = contiguous_text(cfg, _who(partition_id=1, num_partitions=2))
    assert first + second == train and pid == 1
    assert contiguous_text(cfg, _who())[0] == train  # no partition info: partition 0 of 1
    with pytest.raises(ConfigError, match="partition-id=2"):
        contiguous_text(cfg, _who(partition_id=2, num_partitions=2))
    with pytest.raises(ConfigError, match="give both or neither"):
        contiguous_text(cfg, _who(partition_id=1))
    own = tmp_path / "part.txt"
    own.write_text(train[:5000])
    assert contiguous_text(cfg, _who(data_path=own, partition_id=0, num_partitions=2))[0] == train[:5000]
    with pytest.raises(ConfigError, match="data-path"):
        contiguous_text(cfg, _who(data_path=tmp_path))
    feed = make_feed(None, cfg.model_copy(update={"batch_size": 2, "seq_len": 8}), _who(data_path=own),  # type: ignore[arg-type]
                     CharTokenizer.from_text(source.read_text()), 1)
    assert isinstance(feed, WindowFeed) and len(feed.tokens) == 5000


# --- report -----------------------------------------------------------------------------------


def _event(kind: str, **fields) -> dict:
    return {"type": kind, "stream": "control", "event": {"run_id": "r", **fields}}


def test_the_report_has_the_examples_table_for_the_shakespeare_task(tmp_path: Path) -> None:
    records = [_event("RunStarted", config_json=json.dumps({"task": "shakespeare"}))]
    for round, loss in enumerate([4.2, 3.0, 2.6]):
        if round:
            records.append(_event("RoundClosed", round=round, mean_loss=loss + 0.3, tokens="100"))
        records.append(_event("EvalCompleted", round=round, status="EVAL_STATUS_OK", bpb=loss / math.log(2),
                              val_loss=loss, sample="ROMEO:\nwhat"))
    text = render_markdown(summarize(records), {}, tmp_path, has_log=True, log_path=tmp_path / "events.jsonl")
    assert "| Round | Train Loss | Val Loss | Perplexity |" in text
    assert "| 0 | – | 4.20 | 66.7 |" in text and f"| 2 | 2.90 | 2.60 | {math.exp(2.6):.1f} |" in text
    assert "ROMEO:\nwhat" in text
    records[0] = _event("RunStarted", config_json=json.dumps({"task": "pretrain"}))
    plain = render_markdown(summarize(records), {}, tmp_path, has_log=True, log_path=tmp_path / "events.jsonl")
    assert "Perplexity" not in plain
