"""The thin ClientApp's torch-free side of the trainer host: settings, socket paths, file exchange, mappings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pilot.errors import ConfigError
from pilot.protocol import RoundOrder
from services.trainer.host_client import (
    MAX_SOCKET_PATH,
    HostSettings,
    identity_from_spec,
    order_from_request,
    read_arrays,
    round_request,
    socket_path,
    spec_from_identity,
    write_arrays,
)
from services.trainer.identity import TrainerIdentity, default_work_dir, identity_from_node_config

REPO = Path(__file__).resolve().parents[2]


def test_the_thin_client_app_imports_no_torch() -> None:
    code = ("import sys, services.trainer.client_app, services.trainer.host_client; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_socket_path_falls_back_to_a_short_tmp_path_for_deep_work_dirs(tmp_path: Path) -> None:
    short = tmp_path / "w"
    assert socket_path(short) == short.resolve() / "host.sock"
    deep, other = tmp_path / ("d" * 60) / ("e" * 60), tmp_path / ("d" * 60) / ("f" * 60)
    fallback = socket_path(deep)
    assert fallback.parent == Path("/tmp") and fallback.name.startswith("pilot-host-")
    assert len(str(fallback).encode()) <= MAX_SOCKET_PATH < len(str(deep / "host.sock").encode())
    assert socket_path(deep) == fallback != socket_path(other)


def test_host_settings_from_node_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PILOT_TRAINER_HOST", raising=False)
    assert HostSettings.from_node_config({}) == HostSettings()
    monkeypatch.setenv("PILOT_TRAINER_HOST", "off")
    assert HostSettings.from_node_config({}).mode == "off"
    assert HostSettings.from_node_config({"trainer-host": "on"}).mode == "on"  # the node-config wins
    monkeypatch.setenv("PILOT_TRAINER_HOST", "maybe")
    with pytest.raises(ConfigError, match=r"\$PILOT_TRAINER_HOST='maybe'"):
        HostSettings.from_node_config({})
    monkeypatch.delenv("PILOT_TRAINER_HOST")
    settings = HostSettings.from_node_config({"trainer-host": "ON", "trainer-host-idle-s": 30})
    assert settings.mode == "on" and settings.idle_exit_s == 30.0 and settings.use_host()
    assert not HostSettings.from_node_config({"trainer-host": "off"}).use_host()
    assert not HostSettings().use_host()  # auto, in a process that is not flwr-clientapp: in-process
    with pytest.raises(ConfigError, match="trainer-host='sometimes'"):
        HostSettings.from_node_config({"trainer-host": "sometimes"})
    with pytest.raises(ConfigError, match="trainer-host-idle-s"):
        HostSettings.from_node_config({"trainer-host-idle-s": "soon"})
    with pytest.raises(ConfigError, match="trainer-host-start-s must be > 0"):
        HostSettings.from_node_config({"trainer-host-start-s": 0})


def test_arrays_round_trip_through_a_file_in_their_order(tmp_path: Path) -> None:
    arrays = {"z.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a::scale": np.array([0.5], np.float32),
              "m.q": np.array([[-127, 3]], dtype=np.int8), "b.bf16": np.array([1, -2], dtype=np.int16)}
    path = write_arrays(tmp_path / "x" / "u.safetensors", arrays)
    back = read_arrays(path)
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["u.safetensors"]  # no temporary left behind


def test_identity_and_order_survive_the_round_request(tmp_path: Path) -> None:
    order = RoundOrder(round=3, seconds=30.0, steps=0, since_id="17-0", tokenizer_sha256="ab" * 32,
                       run_config={"run-id": "r1", "preset": "d4"})
    for who in (TrainerIdentity(trainer_id="t0", node_id=2**63 + 5, work_dir=tmp_path),
                TrainerIdentity(trainer_id="t1", node_id=7, work_dir=tmp_path, data_path=tmp_path / "d",
                                device="cpu", partition_id=0, num_partitions=2, num_devices=2)):
        request = round_request(order, who, tmp_path / "w.safetensors", elapsed_s=1.5)
        assert request.run_id == "r1" and request.elapsed_s == 1.5
        assert identity_from_spec(spec_from_identity(who)) == who
        assert order_from_request(request) == order


def test_identity_from_node_config(tmp_path: Path) -> None:
    who = identity_from_node_config({"partition-id": 1, "num-partitions": 3}, 9, "run-x")
    assert who.trainer_id == "node-9" and who.work_dir == default_work_dir("run-x", "node-9")
    assert (who.partition_id, who.num_partitions, who.num_devices) == (1, 3, 1)
    with pytest.raises(ConfigError, match="num-devices='two'"):
        identity_from_node_config({"num-devices": "two"}, 9, "run-x")
