"""BPETokenizer: round trips, tiktoken vs the Rust encoder, the artifact and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import pilot_rustbpe
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot.bpe import GPT4_SPLIT, BPETokenizer, train_bpe
from pilot.errors import TokenizerError
from pilot.tokenizer import ARTIFACT_FILE, BOS, NANOCHAT_SPECIALS, Tokenizer, load_tokenizer

ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path: Path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(shakespeare_path: Path) -> BPETokenizer:
    return train_bpe(shakespeare_path, 800, progress=False)


@pytest.fixture(scope="module")
def rust_encoder(tok: BPETokenizer) -> pilot_rustbpe.Encoder:
    return pilot_rustbpe.Encoder(list(tok.mergeable_ranks.items()), tok.pattern)


def test_implements_the_tokenizer_interface(tok: BPETokenizer) -> None:
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 800 and len(tok.mergeable_ranks) == 800 - len(NANOCHAT_SPECIALS)
    assert tok.bos_id == 791 == tok.special_tokens[BOS]
    assert list(tok.special_tokens) == list(NANOCHAT_SPECIALS)
    assert tok.name == "bpe800" and len(tok.sha256) == 64


def test_encode_adds_no_bos_and_treats_special_text_as_text(tok: BPETokenizer) -> None:
    ids = tok.encode("to be <|bos|>")
    assert tok.bos_id not in ids
    assert tok.decode(ids) == "to be <|bos|>"
    assert tok.decode([tok.bos_id]) == BOS
    assert tok.encode_batch(["to be", "or not"], num_threads=2) == [tok.encode("to be"), tok.encode("or not")]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",))))
def test_decode_encode_round_trips_any_unicode(tok: BPETokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ASSIGNED, max_size=80))
def test_tiktoken_equals_rust_encoder_on_random_text(
    tok: BPETokenizer, rust_encoder: pilot_rustbpe.Encoder, text: str
) -> None:
    assert tok.encode(text) == rust_encoder.encode(text)


def test_tiktoken_equals_rust_encoder_on_real_text(
    tok: BPETokenizer, rust_encoder: pilot_rustbpe.Encoder, shared_data: Path
) -> None:
    text = (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:300_000]
    docs = text.split("\n\n")
    assert tok.encode_batch(docs) == rust_encoder.encode_batch(docs)
    # BPE compresses: fewer tokens than bytes on text like its training data
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_token_bytes(tok: BPETokenizer) -> None:
    lengths = tok.token_bytes()
    assert lengths.dtype == torch.int64 and lengths.shape == (tok.vocab_size,)
    assert lengths[:256].tolist() == [1] * 256
    assert lengths[tok.bos_id :].tolist() == [0] * len(NANOCHAT_SPECIALS)
    for token, rank in list(tok.mergeable_ranks.items())[256:300]:
        assert lengths[rank] == len(token) >= 2


def test_save_load_round_trip(tok: BPETokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / ARTIFACT_FILE
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["kind"] == "bpe" and obj["version"] == 1 and obj["vocab_size"] == 800
    assert obj["mergeable_ranks"][65] == "QQ== 65"  # base64 of b"A", rank 65
    assert obj["sha256"] == tok.sha256
    assert [p.name for p in (tmp_path / "tok").iterdir()] == [ARTIFACT_FILE]  # no temp files left
    loaded = BPETokenizer.load(tmp_path / "tok")
    assert loaded.sha256 == tok.sha256 and loaded.mergeable_ranks == tok.mergeable_ranks
    assert load_tokenizer(tmp_path / "tok", expected_sha256=tok.sha256).encode("to be") == tok.encode("to be")


def _edit(path: Path, change: object) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)  # type: ignore[operator]
    path.write_text(json.dumps(obj), encoding="utf-8")


def test_tampered_artifact_is_refused(tok: BPETokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path)
    _edit(path, lambda obj: obj["mergeable_ranks"].__setitem__(300, "QUJD 300"))
    with pytest.raises(TokenizerError, match=f"{path}.*checksum"):
        BPETokenizer.load(tmp_path)


def test_truncated_artifact_is_refused(tok: BPETokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TokenizerError, match=str(path)):
        BPETokenizer.load(tmp_path)


def test_consistent_but_wrong_artifact_is_refused(tok: BPETokenizer, tmp_path: Path) -> None:
    """A re-hashed artifact whose fields do not form a valid tokenizer."""
    from pilot.tokenizer import canonical_sha256

    path = tok.save(tmp_path)

    def drop_byte(obj: dict) -> None:  # type: ignore[type-arg]
        del obj["mergeable_ranks"][10]
        obj["sha256"] = canonical_sha256(obj)

    _edit(path, drop_byte)
    with pytest.raises(TokenizerError, match="ranks"):
        BPETokenizer.load(tmp_path)


def test_bad_ids_and_bad_pattern(tok: BPETokenizer) -> None:
    with pytest.raises(TokenizerError, match="token id 800"):
        tok.decode([1, 800])
    with pytest.raises(TokenizerError, match="does not compile"):
        BPETokenizer(tok.mergeable_ranks, "(unclosed")
    assert tok.pattern == GPT4_SPLIT
