"""`pilot tokenizer train | info | encode`, and its offline reference-encoding check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pilot.bpe import BPETokenizer
from pilot.cli import app
from pilot.cli.tokenizer import cached_reference_encodings

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shakespeare_path: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tok")
    result = runner.invoke(
        app,
        [
            "tokenizer",
            "train",
            "--input",
            str(shakespeare_path),
            "--vocab-size",
            "600",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    return out, result.output


def test_train_saves_and_reports(trained: tuple[Path, str]) -> None:
    out, output = trained
    assert "trained bpe600 in" in output
    assert "bytes/token on" in output and "held-out tail" in output
    tok = BPETokenizer.load(out)
    assert tok.vocab_size == 600
    bpt = float(output.split("held-out tail of the input: ")[1].split()[0])
    assert 2.0 < bpt < 5.0  # a 600-token BPE on English: a few bytes per token


def test_info_and_encode(trained: tuple[Path, str]) -> None:
    out, _ = trained
    info = runner.invoke(app, ["tokenizer", "info", str(out)])
    assert info.exit_code == 0 and "vocab size:     600 (591 byte-level + 9 special)" in info.output
    enc = runner.invoke(app, ["tokenizer", "encode", str(out), "To be, or not"])
    assert enc.exit_code == 0
    ids = BPETokenizer.load(out).encode("To be, or not")
    assert f"{len(ids)} tokens: {ids}" in enc.output
    assert enc.output.splitlines()[1].replace(" | ", "") == "To be, or not"


def test_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tokenizer", "train", "--input", str(tmp_path / "none"), "--vocab-size", "600"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: training input {tmp_path / 'none'} does not exist"
    result = runner.invoke(app, ["tokenizer", "info", str(tmp_path)])
    assert result.exit_code == 2 and "no tokenizer artifact" in result.output


def test_reference_encodings_detected_from_the_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert cached_reference_encodings() == []
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"")
    assert cached_reference_encodings() == ["cl100k_base"]
