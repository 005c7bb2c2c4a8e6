"""Run directories of numbered checkpoints: naming, finding the latest, pruning.

A checkpoint folder (by default ``<run_dir>/checkpoints``) holds one directory
per round, ``round_00012``; every helper here takes that folder. Hidden
``.round_N.tmp-*`` staging and ``.round_N.old-*`` backup directories and
directories without a valid sidecar are never reported as checkpoints.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pilot.checkpoint.meta import CHECKPOINTS_SUBDIR, SIDECAR_NAME, read_checkpoint_meta
from pilot.errors import CheckpointError
from pilot.log import get_logger

log = get_logger(__name__)


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The default checkpoint folder of a run: ``<run_dir>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_SUBDIR


def round_checkpoint_path(checkpoint_dir: str | Path, round: int, *, prefix: str = "round") -> Path:
    """``<checkpoint_dir>/round_00012`` for round 12 (zero-padded to 5 digits, more if needed)."""
    if not isinstance(round, int) or round < 0:
        raise CheckpointError(f"round must be a non-negative int, got {round!r}")
    return Path(checkpoint_dir) / f"{prefix}_{round:05d}"


def list_checkpoints(checkpoint_dir: str | Path, *, prefix: str = "round") -> list[tuple[int, Path]]:
    """Complete checkpoints ``<prefix>_<n>`` in ``checkpoint_dir`` as (n, path), oldest first.

    Hidden staging/backup directories, names that do not match, and directories
    whose sidecar is missing or invalid are skipped (the last with a warning).
    Tensor files are not hashed here; loading does that.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    found: list[tuple[int, Path]] = []
    for child in directory.iterdir():
        match = pattern.match(child.name)
        if not match or not child.is_dir() or not (child / SIDECAR_NAME).is_file():
            continue
        try:
            read_checkpoint_meta(child)
        except CheckpointError as exc:
            log.warning("skipping invalid checkpoint", path=str(child), reason=str(exc))
            continue
        found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path, *, prefix: str = "round") -> Path | None:
    """The highest-numbered complete checkpoint in ``checkpoint_dir``, or None."""
    found = list_checkpoints(checkpoint_dir, prefix=prefix)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int, *, prefix: str = "round") -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, plus staging
    directories left by dead writers of this host; return what was removed."""
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
    directory = Path(checkpoint_dir)
    found = list_checkpoints(directory, prefix=prefix)
    removed = [path for _, path in found[:-keep_last]]
    if directory.is_dir():
        leftover = re.compile(rf"^\.({re.escape(prefix)}_\d+)\.(tmp|old)-(\d+)-[0-9a-f]+$")
        for child in directory.iterdir():
            match = leftover.match(child.name)
            if not match or not child.is_dir() or _pid_alive(int(match.group(3))):
                continue
            # A backup from an interrupted overwrite is the only copy until its target exists again.
            if match.group(2) == "old" and not (directory / match.group(1) / SIDECAR_NAME).is_file():
                continue
            removed.append(child)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        log.info("checkpoints pruned", removed=[str(p) for p in removed], kept=keep_last)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
