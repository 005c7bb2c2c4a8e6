"""Byte and char tokenizers, the artifact format, and load_tokenizer dispatch."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot.errors import TokenizerError
from pilot.tokenizer import (
    ARTIFACT_FILE,
    BOS,
    NANOCHAT_SPECIALS,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    canonical_sha256,
    load_tokenizer,
    read_artifact,
    write_artifact,
)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_unicode(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # no BOS, one id per UTF-8 byte
    assert tok.decode(ids) == text


def test_byte_layout_and_token_bytes() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id) == (256 + 9, 256)
    assert tok.specials == NANOCHAT_SPECIALS
    counts = tok.token_bytes()
    assert counts.dtype == torch.int64 and counts.shape == (265,)
    assert counts[:256].tolist() == [1] * 256 and counts[256:].tolist() == [0] * 9
    assert tok.encode_batch(["a", "é"]) == [[97], [0xC3, 0xA9]]


def test_byte_decode_specials_and_invalid_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.decode([tok.bos_id, 104, 105, tok.special_ids["<|assistant_end|>"]]) == "<|bos|>hi<|assistant_end|>"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    with pytest.raises(TokenizerError, match="token id 265"):
        tok.decode([265])


def test_char_tokenizer_on_shakespeare(shakespeare_path: Path) -> None:
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert len(tok.chars) == 65 and tok.vocab_size == 66 and tok.bos_id == 65
    assert tok.chars == sorted(tok.chars)
    sample = text[:5000]
    ids = tok.encode(sample)
    assert len(ids) == len(sample) and max(ids) < 65
    assert tok.decode(ids) == sample
    assert tok.decode([tok.bos_id, *tok.encode("Hi")]) == BOS + "Hi"
    assert tok.token_bytes().tolist() == [1] * 65 + [0]


def test_char_unknown_character_is_named() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\)"):
        tok.encode("abz")


def test_char_token_bytes_counts_utf8() -> None:
    tok = CharTokenizer.from_text("aé€😀")
    assert tok.token_bytes().tolist() == [1, 2, 3, 4, 0]


def test_char_artifact_round_trip(tmp_path: Path) -> None:
    tok = CharTokenizer.from_text("hello world\n")
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / ARTIFACT_FILE
    for spec in (tmp_path / "tok", path, str(path)):
        loaded = load_tokenizer(spec)
        assert isinstance(loaded, CharTokenizer)
        assert loaded.chars == tok.chars and loaded.sha256 == tok.sha256
    # the digest ignores formatting: re-indenting the file keeps it valid
    obj = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    assert load_tokenizer(path).sha256 == tok.sha256


def test_char_artifact_tamper_refused(tmp_path: Path) -> None:
    path = CharTokenizer.from_text("abc").save(tmp_path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    obj["chars"] = ["a", "b", "x"]
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(TokenizerError, match="checksum"):
        load_tokenizer(tmp_path)


def test_identity_differs_between_tokenizers() -> None:
    shas = {CharTokenizer.from_text("abc").sha256, CharTokenizer.from_text("abd").sha256, ByteTokenizer().sha256}
    assert len(shas) == 3
    assert ByteTokenizer().sha256 == ByteTokenizer().sha256


def test_byte_artifact_round_trip(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.sha256 == ByteTokenizer().sha256


def test_load_tokenizer_specs(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    char = load_tokenizer("char", text_for_char="ba")
    assert isinstance(char, CharTokenizer) and char.chars == ["a", "b"]
    with pytest.raises(TokenizerError, match="needs the training text"):
        load_tokenizer("char")
    with pytest.raises(TokenizerError, match="no-such-tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(TokenizerError, match="expected deadbeef"):
        load_tokenizer("byte", expected_sha256="deadbeef")
    write_artifact(tmp_path / "odd", {"kind": "wordpiece"})
    with pytest.raises(TokenizerError, match="unknown kind 'wordpiece'"):
        load_tokenizer(tmp_path / "odd")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ARTIFACT_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not readable JSON"):
        load_tokenizer(tmp_path / "bad")


def test_bpe_kind_dispatches_to_pilot_bpe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    sentinel = ByteTokenizer()

    class FakeBPE:
        @classmethod
        def load(cls, directory: Path) -> ByteTokenizer:
            calls.append(directory)
            return sentinel

    module = types.ModuleType("pilot.bpe")
    module.BPETokenizer = FakeBPE  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pilot.bpe", module)
    write_artifact(tmp_path, {"kind": "bpe", "version": 1})
    assert load_tokenizer(tmp_path / ARTIFACT_FILE) is sentinel
    assert calls == [tmp_path]


def test_artifact_helpers_digest_excludes_itself(tmp_path: Path) -> None:
    path = write_artifact(tmp_path, {"kind": "x", "n": 1})
    obj = read_artifact(path)
    assert obj["sha256"] == canonical_sha256({"kind": "x", "n": 1}) == canonical_sha256(obj)
    with pytest.raises(TokenizerError, match="'kind'"):
        write_artifact(tmp_path, {"n": 1})
