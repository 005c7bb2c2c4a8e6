"""Checkpoints: round trips, tamper/truncation detection, crash safety, run-dir helpers, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import pilot.checkpoint.store as store
from pilot.checkpoint import (
    SIDECAR_NAME,
    CheckpointMeta,
    TokenizerIdentity,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_meta,
    read_tensor_index,
    round_checkpoint_path,
    save_checkpoint,
    verify_checkpoint,
)
from pilot.cli import checkpoint as checkpoint_cli
from pilot.errors import CheckpointError
from pilot.hashing import sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 64, "window": [128, 64]}


def make_meta(round: int | None = 1, **changes: object) -> CheckpointMeta:
    fields: dict[str, object] = {
        "kind": "round",
        "round": round,
        "step": 10 * (round or 0),
        "tokens_seen": 4096 * (round or 0),
        "model_config": dict(CONFIG),
        "tokenizer": TokenizerIdentity(name="bytes-64", sha256="ab" * 32),
        "extra": {"optimizer": "nesterov", "outer_momentum": True, "cursor": {"shard": 3, "row_group": 7}},
    }
    fields.update(changes)
    return CheckpointMeta(**fields)  # type: ignore[arg-type]


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "wte.weight": torch.randn(64, 32, generator=gen),
        "blocks.0.attn.weight": torch.randn(32, 32, generator=gen).to(torch.bfloat16),
        "lm_head.weight": torch.randn(32, 64, generator=gen).t(),  # non-contiguous
        "steps": torch.tensor([3], dtype=torch.int64),
    }


def save_round(checkpoint_dir: Path, round: int, seed: int = 0) -> Path:
    tensors = {"model": weights(seed), "outer_momentum": {"wte.weight": torch.full((64, 32), float(round))}}
    return save_checkpoint(round_checkpoint_path(checkpoint_dir, round), tensors, make_meta(round))


def flip_byte(path: Path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_fp32_bf16_groups_and_metadata(tmp_path: Path) -> None:
    path = save_round(tmp_path, 12)
    assert path == tmp_path / "round_00012"
    assert sorted(p.name for p in path.iterdir()) == [SIDECAR_NAME, "model.safetensors", "outer_momentum.safetensors"]
    ckpt = load_checkpoint(path, expect_model_config=CONFIG)
    for name, tensor in weights(0).items():
        assert ckpt.model[name].dtype == tensor.dtype
        assert torch.equal(ckpt.model[name], tensor)
    assert torch.equal(ckpt.group("outer_momentum")["wte.weight"], torch.full((64, 32), 12.0))
    meta = ckpt.meta
    expected = make_meta(12)
    assert (meta.kind, meta.round, meta.step, meta.tokens_seen) == ("round", 12, 120, 4096 * 12)
    assert meta.tokenizer == expected.tokenizer and meta.extra == expected.extra
    assert meta.model_config == CONFIG and meta.created_at.endswith("Z")
    assert meta.files["model"].sha256 == sha256_file(path / "model.safetensors")
    assert meta.files["model"].size == (path / "model.safetensors").stat().st_size
    assert meta.files["model"].tensors == 4
    with pytest.raises(CheckpointError, match="no tensor group 'optimizer'"):
        ckpt.group("optimizer")


def test_single_state_dict_becomes_model_group_and_groups_load_selectively(tmp_path: Path) -> None:
    shared = torch.randn(8, 4)
    path = save_checkpoint(tmp_path / "ckpt", {"a": shared, "tied": shared}, make_meta(kind="model", round=None))
    assert read_checkpoint_meta(path).kind == "model"
    ckpt = load_checkpoint(path / SIDECAR_NAME, groups=["model"])  # the sidecar path works too
    assert torch.equal(ckpt.model["tied"], shared) and list(ckpt.tensors) == ["model"]
    assert read_tensor_index(path / "model.safetensors")["a"].shape == (8, 4)
    with pytest.raises(CheckpointError, match="no tensor group"):
        load_checkpoint(path, groups=["outer_momentum"])


def test_sha256_file_streams_in_chunks(tmp_path: Path) -> None:
    blob = os.urandom(100_001)
    (tmp_path / "blob").write_bytes(blob)
    assert sha256_file(tmp_path / "blob", chunk_bytes=4096) == hashlib.sha256(blob).hexdigest()


def test_flipped_byte_is_detected_and_named(tmp_path: Path) -> None:
    path = save_round(tmp_path, 1)
    flip_byte(path / "outer_momentum.safetensors")
    with pytest.raises(CheckpointError, match=r"outer_momentum\.safetensors.*sha256 mismatch: expected [0-9a-f]{64}, got"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="outer_momentum.safetensors"):
        verify_checkpoint(path)
    assert verify_checkpoint(path, groups=["model"]).round == 1  # the untouched group still verifies


def test_truncated_and_missing_files_are_refused(tmp_path: Path) -> None:
    path = save_round(tmp_path, 1)
    model_file = path / "model.safetensors"
    size = model_file.stat().st_size
    os.truncate(model_file, size - 100)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*has {size - 100} bytes, expected {size}"):
        load_checkpoint(path, check_hash=False)
    model_file.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*is missing"):
        verify_checkpoint(path)


def test_missing_or_invalid_sidecar(tmp_path: Path) -> None:
    good = save_round(tmp_path, 1)
    broken = save_round(tmp_path, 2)
    headless = save_round(tmp_path, 3)
    (broken / SIDECAR_NAME).write_text('{"format": "pilot-checkpoint", ')
    (headless / SIDECAR_NAME).unlink()
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no checkpoint.json sidecar"):
        load_checkpoint(headless)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "round_00099")
    assert latest_checkpoint(tmp_path) == good


def test_sidecar_cannot_point_outside_the_checkpoint_or_claim_a_newer_format(tmp_path: Path) -> None:
    path = save_round(tmp_path, 1)
    sidecar = json.loads((path / SIDECAR_NAME).read_text())
    sidecar["files"]["model"]["file"] = "../../etc/passwd"
    (path / SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="bad file"):
        read_checkpoint_meta(path)
    sidecar["format_version"] = 99
    (path / SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_checkpoint_meta(path)


def test_expect_model_config_mismatch_names_the_keys(tmp_path: Path) -> None:
    path = save_round(tmp_path, 1)
    load_checkpoint(path, expect_model_config={**CONFIG, "window": (128, 64)})  # tuple == stored list
    other = {**CONFIG, "n_layer": 4, "rope_base": 10000}
    del other["n_head"]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, expect_model_config=other)
    message = str(info.value)
    assert "n_layer: checkpoint has 2, expected 4" in message
    assert "n_head" in message and "rope_base" in message and "n_embd" not in message


def test_invalid_metadata_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="needs its round"):
        make_meta(round=None)
    with pytest.raises(CheckpointError, match="extra is not JSON-serialisable"):
        make_meta(extra={"bad": object()})
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint(tmp_path / "x", {"model": {"w": [1.0]}}, make_meta())  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_existing_checkpoint_needs_overwrite(tmp_path: Path) -> None:
    path = save_round(tmp_path, 1, seed=0)
    with pytest.raises(CheckpointError, match="already exists"):
        save_round(tmp_path, 1, seed=1)
    save_checkpoint(path, {"model": weights(1)}, make_meta(1), overwrite=True)
    assert torch.equal(load_checkpoint(path).model["wte.weight"], weights(1)["wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00001"]  # no backup left behind


def test_write_failing_half_way_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = save_round(tmp_path, 1)
    real_write = store._write_group
    written: list[str] = []

    def failing_write(directory: Path, group: str, state: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
        if written:
            raise OSError(28, "No space left on device")
        written.append(group)
        return real_write(directory, group, state)

    monkeypatch.setattr(store, "_write_group", failing_write)
    with pytest.raises(CheckpointError, match="No space left"):
        save_round(tmp_path, 2)
    assert written == ["model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00001"]  # staging dir cleaned up
    assert latest_checkpoint(tmp_path) == previous
    assert load_checkpoint(previous).meta.round == 1


def test_overwrite_failing_at_rename_restores_the_old_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_round(tmp_path, 1, seed=0)
    real_rename = os.rename

    def flaky_rename(src: str | Path, dst: str | Path) -> None:
        if ".tmp-" in Path(src).name:
            raise OSError(5, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", flaky_rename)
    with pytest.raises(CheckpointError, match="I/O error"):
        save_checkpoint(path, {"model": weights(1)}, make_meta(1), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00001"]
    assert torch.equal(load_checkpoint(path).model["wte.weight"], weights(0)["wte.weight"])


_KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
import pilot.checkpoint.store as store
from pilot.checkpoint import CheckpointMeta, round_checkpoint_path, save_checkpoint
real_fsync = store._fsync_file
def fsync_then_hang(path):
    real_fsync(path)
    print("written", path.name, flush=True)
    time.sleep(60)  # the parent SIGKILLs us here: one tensor file on disk, no sidecar yet
store._fsync_file = fsync_then_hang
tensors = {"model": {"w": torch.ones(1024, 1024)}, "optimizer": {"m": torch.zeros(1024, 1024)}}
meta = CheckpointMeta(kind="round", round=2, model_config={"n_layer": 2})
save_checkpoint(round_checkpoint_path(Path(sys.argv[1]), 2), tensors, meta)
"""


def test_sigkilled_writer_leaves_previous_checkpoint_latest(tmp_path: Path) -> None:
    previous = save_round(tmp_path, 1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("written model.safetensors"), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".round_00002.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    assert not (tmp_path / "round_00002").exists()
    assert latest_checkpoint(tmp_path) == previous
    assert load_checkpoint(previous).meta.round == 1
    assert prune_checkpoints(tmp_path, keep_last=5) == leftovers  # the dead writer's staging dir goes


def test_latest_orders_numerically_and_prune_keeps_last_n(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "absent") is None
    for round in (3, 99_999, 100_000):
        save_checkpoint(round_checkpoint_path(tmp_path, round), {"w": torch.zeros(1)}, make_meta(round))
    (tmp_path / "round_00007").mkdir()  # no sidecar: incomplete
    live = tmp_path / f".round_00008.tmp-{os.getpid()}-abcd"  # a writer that is still running
    live.mkdir()
    orphan_backup = tmp_path / ".round_00009.old-999999999-abcd"  # only copy of round 9: keep
    orphan_backup.mkdir()
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 99_999, 100_000]
    assert latest_checkpoint(tmp_path) == tmp_path / "round_100000"
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert removed == [tmp_path / "round_00003"]
    assert live.is_dir() and orphan_backup.is_dir()
    assert [r for r, _ in list_checkpoints(tmp_path)] == [99_999, 100_000]
    with pytest.raises(CheckpointError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)


@pytest.fixture()
def cli() -> tuple[CliRunner, typer.Typer]:
    app = typer.Typer()
    checkpoint_cli.register(app)
    return CliRunner(), app


def test_cli_verify_exit_codes(tmp_path: Path, cli: tuple[CliRunner, typer.Typer]) -> None:
    runner, app = cli
    path = save_round(tmp_path, 5)
    ok = runner.invoke(app, ["checkpoint", "verify", str(path)])
    assert ok.exit_code == 0, ok.output
    assert "round 5" in ok.stdout and "OK: 2 tensor file(s)" in ok.stdout
    missing = runner.invoke(app, ["checkpoint", "verify", str(tmp_path / "round_00006")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.stderr
    flip_byte(path / "model.safetensors")
    tampered = runner.invoke(app, ["checkpoint", "verify", str(path)])
    assert tampered.exit_code == 2
    assert tampered.stderr.count("\n") == 1 and "model.safetensors" in tampered.stderr and "sha256" in tampered.stderr


def test_cli_info_json(tmp_path: Path, cli: tuple[CliRunner, typer.Typer]) -> None:
    runner, app = cli
    path = save_round(tmp_path, 4)
    result = runner.invoke(app, ["checkpoint", "info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["round"] == 4 and info["model_config"] == CONFIG
    assert info["groups"]["model"] == {"tensors": 4, "parameters": 64 * 32 + 32 * 32 + 32 * 64 + 1, "dtypes": ["BF16", "F32", "I64"]}
    text = runner.invoke(app, ["checkpoint", "info", str(path)])
    assert text.exit_code == 0 and "outer_momentum" in text.stdout
