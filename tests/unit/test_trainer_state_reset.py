"""A fresh ``pilot run`` must not hand its trainers an earlier run's inner optimiser or residual."""

from __future__ import annotations

from pilot.launcher import reset_local_trainers
from services.trainer.identity import INNER_STATE, RESIDUAL_FILE, default_work_dir


def test_fresh_removes_round_to_round_state_and_keeps_caches() -> None:
    work = default_work_dir("reset-run", "trainer-0")
    (work / INNER_STATE).mkdir(parents=True)
    (work / INNER_STATE / "checkpoint.json").write_text("{}")
    (work / RESIDUAL_FILE).write_bytes(b"x")
    (work / "compile-cache").mkdir()
    (work / "host.log").write_text("kept")
    other = default_work_dir("reset-run", "trainer-1")  # a trainer that never trained: nothing to do

    removed = reset_local_trainers("reset-run", ["trainer-0", "trainer-1"])

    assert sorted(p.name for p in removed) == sorted([INNER_STATE, RESIDUAL_FILE])
    assert not (work / INNER_STATE).exists() and not (work / RESIDUAL_FILE).exists()
    assert (work / "compile-cache").is_dir() and (work / "host.log").read_text() == "kept"
    assert not other.exists()
    assert reset_local_trainers("reset-run", ["trainer-0"]) == []  # idempotent
