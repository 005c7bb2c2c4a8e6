"""BPE training with pilot_rustbpe: merges equal PyPI rustbpe's and a textbook BPE's;
files, parquet and document streams agree; limits and bad input behave."""

from __future__ import annotations

import itertools
from array import array
from collections import Counter
from pathlib import Path

import pilot_rustbpe
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from pilot.bpe import GPT4_SPLIT, TextSource, discover, holdout_split, train_bpe
from pilot.errors import TokenizerError


def _ranks(docs: list[str], vocab: int, **options: object) -> list[tuple[bytes, int]]:
    trainer = pilot_rustbpe.Trainer(**options)  # type: ignore[arg-type]
    trainer.feed(docs)
    return trainer.train(vocab)


def _reference_ranks(docs: list[str], vocab: int) -> list[tuple[bytes, int]]:
    """PyPI rustbpe 0.1.0 on the same documents and pattern."""
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(docs), vocab, pattern=GPT4_SPLIT)
    return [(bytes(b), r) for b, r in ref.get_mergeable_ranks()]


@pytest.fixture(scope="module")
def real_docs(shared_data: Path) -> list[str]:
    """~1.7 MB of real text as paragraph documents."""
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    text += (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:500_000]
    return text.split("\n\n")


def test_merges_identical_to_pypi_rustbpe(real_docs: list[str]) -> None:
    ours = _ranks(real_docs, 1024)
    assert len(ours) == 1024
    assert ours == _reference_ranks(real_docs, 1024)


def test_single_thread_and_regex_engine_give_the_same_merges(real_docs: list[str]) -> None:
    docs = real_docs[: len(real_docs) // 4]
    fast = _ranks(docs, 600)
    assert _ranks(docs, 600, threads=1) == fast
    # the same pattern spelled differently is not recognised, so fancy-regex runs it
    assert _ranks(docs, 600, pattern="(?:" + GPT4_SPLIT + ")") == fast


def _textbook_bpe(docs: list[str], vocab: int) -> list[bytes]:
    """Recount all pairs every step; highest count wins, ties to the smallest pair."""
    chunks = Counter(c for d in docs for c in regex.findall(GPT4_SPLIT, d))
    words = [([bytes([b]) for b in c.encode("utf-8")], n) for c, n in chunks.items()]
    ids = {bytes([b]): b for b in range(256)}
    merged: list[bytes] = []
    while len(ids) < vocab:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words:
            for a, b in itertools.pairwise(word):
                pairs[a, b] += n
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], -ids[p[0]], -ids[p[1]]))
        ids[a + b] = len(ids)
        merged.append(a + b)
        for word, _ in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == a and word[i + 1] == b:
                    word[i : i + 2] = [a + b]
                i += 1
    return merged


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.text(alphabet="ab cd\n'!1é", max_size=40), min_size=1, max_size=8),
    st.integers(256, 300),
)
def test_tiny_corpora_match_textbook_bpe(docs: list[str], vocab: int) -> None:
    if not "".join(docs):
        return
    ours = [b for b, _ in _ranks(docs, vocab)[256:]]
    assert ours == _textbook_bpe(docs, vocab)


# Characters assigned in this Python's Unicode version: newer ones (e.g. CJK
# Extension J) are letters to one engine and unassigned to another.
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=ASSIGNED, max_size=60))
def test_splitter_matches_the_regex_module(text: str) -> None:
    assert pilot_rustbpe.split(text) == regex.findall(GPT4_SPLIT, text)


def test_file_parquet_and_iterator_agree(tmp_path: Path, real_docs: list[str]) -> None:
    docs = real_docs[:300]
    text_file = tmp_path / "one.txt"
    text_file.write_text("".join(docs), encoding="utf-8")
    from_file = train_bpe(text_file, 700, progress=False)
    from_doc = train_bpe(["".join(docs)], 700, progress=False)
    assert from_file.mergeable_ranks == from_doc.mergeable_ranks

    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=64)
    large = pa.table({"text": pa.array([*docs[:100], None], type=pa.large_string())})
    pq.write_table(large, tmp_path / "b.parquet")
    from_parquet = train_bpe(tmp_path / "a.parquet", 700, progress=False)
    assert from_parquet.mergeable_ranks == train_bpe(docs, 700, progress=False).mergeable_ranks
    both = train_bpe([tmp_path / "a.parquet", tmp_path / "b.parquet"], 700, progress=False)
    assert both.mergeable_ranks == train_bpe(docs + docs[:100] + [""], 700, progress=False).mergeable_ranks
    # a row range (holdout) reads exactly those rows
    head = train_bpe(TextSource(tmp_path / "a.parquet", stop=100), 700, progress=False)
    assert head.mergeable_ranks == train_bpe(docs[:100], 700, progress=False).mergeable_ranks


def test_doc_cap_and_max_chars() -> None:
    docs = ["ééééé abc", "xyz " * 50, "never seen"]
    trainer = pilot_rustbpe.Trainer(doc_cap=3, max_chars=5)
    trainer.feed(iter(docs))
    assert (trainer.chars, trainer.bytes, trainer.full) == (5, 6 + 2, True)
    capped = _ranks(docs, 300, doc_cap=3, max_chars=5)
    assert capped == _ranks(["ééé", "xy"], 300)


def test_directory_discovery_and_holdout(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second file\n" * 10, encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\n" * 200, encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    files = discover([tmp_path])
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    sources, held_out = holdout_split(files)
    assert sources == [TextSource(files[0])] and held_out == "second file\n" * 10
    sources, held_out = holdout_split(files[:1], fraction=0.05)
    (only,) = sources
    assert only.stop is not None and held_out.startswith("first file")
    assert only.stop + len(held_out) == files[0].stat().st_size


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts_or_files": ["abc"], "vocab_size": 264}, "too small"),
        ({"texts_or_files": [], "vocab_size": 300}, "empty corpus"),
        ({"texts_or_files": ["", ""], "vocab_size": 300}, "empty corpus"),
        ({"texts_or_files": "a bare string", "vocab_size": 300}, "bare str"),
        ({"texts_or_files": ["abc"], "vocab_size": 300, "pattern": "(unclosed"}, "(unclosed"),
        ({"texts_or_files": ["abc", 3], "vocab_size": 300}, "documents must be str"),
        ({"texts_or_files": [Path("/nonexistent/corpus.txt")], "vocab_size": 300}, "/nonexistent/corpus.txt"),
        ({"texts_or_files": ["abc"], "vocab_size": 300, "doc_cap": 0}, "doc_cap"),
    ],
)
def test_bad_input_raises_tokenizer_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TokenizerError, match=regex.escape(message)):
        train_bpe(progress=False, **kwargs)  # type: ignore[arg-type]


def test_invalid_utf8_names_file_and_offset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 10 + b"\xc3\x28 more")
    with pytest.raises(TokenizerError, match=rf"{regex.escape(str(bad))}: invalid UTF-8 at byte offset 100"):
        train_bpe(bad, 300, progress=False)


def test_parquet_without_text_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(TokenizerError, match="no 'text' column"):
        train_bpe(tmp_path / "x.parquet", 300, progress=False)


def test_rust_errors_are_python_exceptions() -> None:
    with pytest.raises(ValueError, match="at least 256"):
        pilot_rustbpe.Trainer().train(100)
    trainer = pilot_rustbpe.Trainer()
    trainer.feed(["ab"])
    trainer.train(257)
    with pytest.raises(ValueError, match="already trained"):
        trainer.train(257)
    with pytest.raises(ValueError, match="bad Arrow"):
        pilot_rustbpe.Trainer().feed_arrow(array("i", [0, 5]), b"abc")
    with pytest.raises(ValueError, match="invalid split pattern"):
        pilot_rustbpe.Trainer(pattern="[")


def test_progress_callbacks_and_their_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[int] = []
    trainer = pilot_rustbpe.Trainer()
    trainer.feed(["some text here"] * 10, buffer_size=3, progress=seen.append)
    assert seen == [42, 84, 126, 140]  # cumulative bytes after each buffer of 3 documents

    def stop(done: int, total: int) -> None:
        raise KeyError(f"stop at {done}/{total}")

    with pytest.raises(KeyError, match="stop at"):
        trainer.train(300, progress=stop)
    train_bpe(["with a progress bar"] * 3, 300, progress=True)
    assert "learning merges" in capsys.readouterr().err
