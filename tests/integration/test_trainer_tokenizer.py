"""A trainer without the run dir gets the run's tokenizer from the tokenizer service, checked by sha256."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilot.errors import TokenizerError
from pilot.run_config import run_config_from
from pilot.tokenizer import CharTokenizer, load_tokenizer
from services.tokenizer.grpc_server import serve_tokenizer
from services.trainer.local_round import TOKENIZER_ADDR_ENV, load_run_tokenizer


def test_trainer_fetches_the_tokenizer_it_was_told_to_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifact = CharTokenizer.from_text("to be or not to be\n").save(tmp_path / "served")
    expected = load_tokenizer(artifact)
    server = serve_tokenizer(artifact, "127.0.0.1:0")
    try:
        cfg = run_config_from({"data": "x", "out": str(tmp_path / "run-elsewhere")})  # no tokenizer there
        with pytest.raises(TokenizerError, match=TOKENIZER_ADDR_ENV):
            load_run_tokenizer(cfg, expected.sha256, tmp_path / "work")
        monkeypatch.setenv(TOKENIZER_ADDR_ENV, f"127.0.0.1:{server.port}")
        got = load_run_tokenizer(cfg, expected.sha256, tmp_path / "work")
        assert got.sha256 == expected.sha256 and got.encode("be or not") == expected.encode("be or not")
        assert any((tmp_path / "work" / "tokenizer-cache").iterdir())
        with pytest.raises(TokenizerError, match="sha256"):
            load_run_tokenizer(cfg, "0" * 64, tmp_path / "work")  # the coordinator named another tokenizer
    finally:
        server.stop(0)
