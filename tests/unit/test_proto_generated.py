"""The generated pilot.v1 package matches proto/pilot/v1 (regenerated into a temp dir)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_proto.py"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True, text=True, timeout=120
    )


def test_committed_generated_code_is_current() -> None:
    result = _check(REPO)
    assert result.returncode == 0, result.stderr


def test_stale_generated_code_is_named_with_the_fix(tmp_path: Path) -> None:
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    shutil.copytree(REPO / "pilot" / "v1", tmp_path / "pilot" / "v1", ignore=shutil.ignore_patterns("__pycache__"))
    events = tmp_path / "proto" / "pilot" / "v1" / "events.proto"
    events.write_text(events.read_text().replace("string detail = 5;", "string detail = 5;\n  string extra = 7;", 1))

    result = _check(tmp_path)

    assert result.returncode == 1
    assert "pilot/v1/events_pb2.py (stale)" in result.stderr
    assert "scripts/gen_proto.py" in result.stderr
