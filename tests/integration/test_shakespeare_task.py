"""The shakespeare task end to end in one process: contiguous partitions, inline evaluation, the report's table.

Real Redis, real trainer ClientApp (threads behind the in-process Grid), real
coordinator with ``eval-inline`` (the task's default), real report; Flower's
SuperLink transport is exercised by tests/e2e/test_shakespeare_run.py.
"""

from __future__ import annotations

from pathlib import Path

from pilot.bus import Bus
from pilot.eventlog import EventLogWriter, event_log_path
from pilot.report import write_report
from pilot.run_config import run_config_from
from pilot.v1 import events_pb2 as ev
from services.coordinator.server_app import run_coordinator
from services.evaluator.results import ResultStore
from tests.integration.inprocess_grid import InProcessGrid


def test_two_partitions_two_rounds_inline_evaluation_and_the_loss_table(
    shakespeare_path: Path, tmp_path: Path, redis_url: str, redis_client, run_id: str
) -> None:
    cfg = run_config_from({
        "task": "shakespeare", "run-id": run_id, "data": str(shakespeare_path), "out": str(tmp_path / "run"),
        "redis-url": redis_url, "preset": "d1", "seq-len": 64, "batch-size": 8, "rounds": 2, "round-steps": 8,
        "min-trainers": 2, "device": "cpu", "trainer-wait-s": 10, "reply-grace-s": 60,
    })
    assert cfg.partition == "contiguous" and cfg.eval_inline and cfg.eval_tokens == 0  # the task's defaults
    grid = InProcessGrid([21, 22], node_configs={21: {"trainer-id": "t0", "partition-id": 0, "num-partitions": 2},
                                                 22: {"trainer-id": "t1", "partition-id": 1, "num-partitions": 2}})
    assert run_coordinator(grid, cfg) == 2

    results = ResultStore(redis_client, run_id).all()
    assert [r.round for r in results] == [0, 1, 2] and all(r.ok for r in results)
    assert not results[0].sampled and results[0].tokens == results[0].split_tokens == 111_540  # the whole split
    losses = [r.loss for r in results]
    assert losses[2] < losses[0], losses  # it learns
    assert 4.0 < losses[0] < 4.6  # ~ln(66) for an untrained char model
    assert len(results[-1].sample) >= 200 and results[-1].prompt == "\n"  # 200 tokens (BOS decodes longer)
    bus = Bus(redis_client, run_id)
    events = [e.event for e in bus.read(count=10_000) if e.event is not None]
    completed = [e for e in events if isinstance(e, ev.EvalCompleted)]
    assert [round(e.val_loss, 6) for e in completed] == [round(x, 6) for x in losses]
    closed = [e for e in events if isinstance(e, ev.RoundClosed)]
    assert [c.valid_updates for c in closed] == [2, 2] and all(c.tokens == 2 * 8 * 8 * 64 for c in closed)

    with EventLogWriter(bus, event_log_path(cfg.run_dir())) as writer:
        writer.drain()
    report = write_report(cfg.run_dir(), eval_results=[r.to_dict() for r in results]).read_text()
    assert "| Round | Train Loss | Val Loss | Perplexity |" in report
    assert f"| 0 | – | {losses[0]:.2f} |" in report and f"| 2 | {closed[1].mean_loss:.2f} | {losses[2]:.2f} |" in report
    assert results[-1].sample in report
