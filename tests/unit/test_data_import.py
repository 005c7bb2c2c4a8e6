"""Text import, the shard layout checks, resolve_data, and the `pilot data` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pilot.cli import app
from pilot.data import dataset_info, import_text, list_shards, resolve_data, split_documents, work_units
from pilot.data.shards import read_shard_texts, write_shard
from pilot.errors import DataError


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab \n", max_size=3000), st.integers(min_value=2, max_value=200))
def test_split_documents_is_lossless_and_bounded(text: str, doc_chars: int) -> None:
    docs = split_documents(text, doc_chars)
    assert "".join(docs) == text
    assert all(docs)
    assert all(len(d) <= 2 * doc_chars for d in docs)


def test_split_prefers_paragraphs_then_lines() -> None:
    paragraphs = "".join(f"para {i} " + "x" * 40 + "\n\n" for i in range(100))
    docs = split_documents(paragraphs, 200)
    assert all(d.endswith("\n\n") for d in docs)  # every cut after a blank line
    lines = "".join("y" * 30 + "\n" for _ in range(100))  # no blank lines at all
    docs = split_documents(lines, 200)
    assert len(docs) > 5 and all(d.endswith("\n") for d in docs)
    assert split_documents("z" * 1000, 100)[0] == "z" * 100  # no line break: hard cut


@pytest.fixture(scope="module")
def shakespeare_shards(shakespeare_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ts") / "shards"
    import_text([shakespeare_path], out, docs_per_row_group=16, row_groups_per_shard=8)
    return out


def test_import_covers_all_text_once_with_held_out_tail(shakespeare_path: Path, shakespeare_shards: Path) -> None:
    text = shakespeare_path.read_text(encoding="utf-8")
    train, val = list_shards(shakespeare_shards)
    assert len(train) >= 2 and val.name == f"shard_{len(train):05d}.parquet"
    train_text = "".join("".join(read_shard_texts(p)) for p in train)
    val_text = "".join(read_shard_texts(val))
    assert train_text + val_text == text  # every character exactly once, in order
    assert text.endswith(val_text) and 0.1 <= len(val_text) / len(text) < 0.12
    info = dataset_info(shakespeare_shards)
    assert all(rows == 16 for s in info.train[:-1] for rows in s.row_group_rows)
    assert all(s.num_row_groups == 8 for s in info.train[:-1])
    manifest = json.loads((shakespeare_shards / "import.json").read_text())
    assert manifest["summary"]["train_docs"] + manifest["summary"]["val_docs"] == info.num_rows
    assert manifest["sources"][0]["bytes"] == len(text.encode("utf-8"))
    units = work_units(train)
    assert len(units) == sum(s.num_row_groups for s in info.train)
    assert units[0].key == "shard_00000.parquet:0" and units[-1].shard_index == len(train) - 1


def test_import_several_files_and_val_docs(shared_data: Path, tmp_path: Path) -> None:
    files = [shared_data / "wikitext-2" / "valid.txt", shared_data / "wikitext-2" / "test.txt"]
    summary = import_text(files, tmp_path / "wt", val_docs=3, docs_per_row_group=32)
    assert summary.val_docs == 3
    assert summary.num_bytes == sum(f.stat().st_size for f in files)
    test_text = files[1].read_text(encoding="utf-8")
    assert test_text.endswith("".join(read_shard_texts(summary.val_shard)))


def test_import_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("one\n\ntwo\n\nthree\n\nfour\n", encoding="utf-8")
    out = tmp_path / "out"
    first = import_text([src], out, doc_chars=4, val_docs=1, docs_per_row_group=1, row_groups_per_shard=1)
    assert first.num_shards == 4
    with pytest.raises(DataError, match="not empty"):
        import_text([src], out, doc_chars=4, val_docs=1)
    summary = import_text([src], out, doc_chars=4, val_docs=1, overwrite=True)
    assert summary.num_shards == 2 and len(list(out.glob("shard_*.parquet"))) == 2  # old shards removed


def test_import_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.txt"):
        import_text([tmp_path / "missing.txt"], tmp_path / "o1")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match="at least one training and one validation"):
        import_text([tiny], tmp_path / "o2")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        import_text([latin], tmp_path / "o3")


def _two_shards(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(directory / "shard_00000.parquet", ["a", "b"], docs_per_row_group=1)
    write_shard(directory / "shard_00001.parquet", ["c"], docs_per_row_group=1)


def test_list_shards_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_shards(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is empty"):
        list_shards(empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no shard_NNNNN\.parquet"):
        list_shards(empty)

    corrupt = tmp_path / "corrupt"
    _two_shards(corrupt)
    (corrupt / "shard_00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"shard_00000\.parquet is not a readable parquet"):
        list_shards(corrupt)

    no_text = tmp_path / "no_text"
    _two_shards(no_text)
    pq.write_table(pa.table({"content": ["x"]}), no_text / "shard_00001.parquet")
    with pytest.raises(DataError, match=r"shard_00001\.parquet has no 'text' column \(columns: content\)"):
        list_shards(no_text)

    single = tmp_path / "single"
    single.mkdir()
    write_shard(single / "shard_00000.parquet", ["a"], docs_per_row_group=1)
    with pytest.raises(DataError, match="at least two shards"):
        list_shards(single)

    good = tmp_path / "good"
    _two_shards(good)
    (good / "shard_00002.parquet.part").write_bytes(b"partial download")  # ignored
    train, val = list_shards(good)
    assert [p.name for p in train] == ["shard_00000.parquet"] and val.name == "shard_00001.parquet"


def test_resolve_data_imports_text_once(shakespeare_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = resolve_data(shakespeare_path, cache)
    assert first.parent == cache and first.name.startswith("input-")
    _, val = list_shards(first)
    stamp = val.stat().st_mtime_ns
    assert resolve_data(shakespeare_path, cache) == first and val.stat().st_mtime_ns == stamp  # cached
    assert [p.name for p in cache.iterdir()] == [first.name]  # no staging leftovers
    assert resolve_data(first) == first  # a shard directory passes through
    with pytest.raises(DataError, match="does not exist"):
        resolve_data(tmp_path / "missing.txt", cache)


def test_cli_import_and_info(shakespeare_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        app, ["data", "import-text", str(shakespeare_path), "--out", str(out), "--row-group-docs", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "train docs" in result.output and "validation docs" in result.output
    info = dataset_info(out)
    assert info.train[0].row_group_rows[0] == 32
    result = runner.invoke(app, ["data", "info", str(out)])
    assert result.exit_code == 0 and f"{info.num_rows:,} rows" in result.output
    result = runner.invoke(app, ["data", "import-text", str(shakespeare_path), "--out", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output
    result = runner.invoke(app, ["data", "info", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output
