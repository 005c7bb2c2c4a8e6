"""download_fineweb against a local HTTP server (Range support, cut transfers, corrupt files)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pilot.data import download_fineweb, list_shards
from pilot.data.shards import read_shard_texts
from pilot.errors import DataError


def _parquet_bytes(index: int) -> bytes:
    docs = [f"document {index}-{i} " + "lorem ipsum " * (100 + i % 50) for i in range(200)]
    sink = io.BytesIO()  # ~300 KB: several of the downloader's 64 KiB chunks
    pq.write_table(pa.table({"text": docs}), sink, row_group_size=50, compression="none")
    return sink.getvalue()


@dataclass
class Site:
    """What the fake hub serves, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)  # names whose first response stops half-way
    ranges: bool = True  # honour Range headers
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            asked = self.headers.get("Range")
            site.requests.append((name, asked))
            data = site.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and site.ranges else 0
            if start >= len(data) and start:
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in site.cut_once:
                site.cut_once.discard(name)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def site() -> Iterator[Site]:
    state = Site(files={f"shard_{i:05d}.parquet": _parquet_bytes(i) for i in range(3)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/datasets/fineweb/resolve/main"
    yield state
    server.shutdown()
    server.server_close()


def _download(site: Site, out: Path, shards: int = 3) -> list[Path]:
    return download_fineweb(
        out, shards, base_url=site.url, retry_base_s=0.01, max_attempts=4, timeout_s=5, progress=False
    )


def test_download_writes_verified_shards_and_skips_complete(site: Site, tmp_path: Path) -> None:
    paths = _download(site, tmp_path)
    assert [p.read_bytes() for p in paths] == list(site.files.values())
    train, val = list_shards(tmp_path)
    assert len(train) == 2 and val == paths[-1]
    assert read_shard_texts(val)[0].startswith("document 2-0")
    assert not list(tmp_path.glob("*.part"))
    site.requests.clear()
    _download(site, tmp_path)
    assert site.requests == []  # complete files are not fetched again


def test_download_resumes_partial_file(site: Site, tmp_path: Path) -> None:
    whole = site.files["shard_00001.parquet"]
    (tmp_path / "shard_00001.parquet.part").write_bytes(whole[:1000])
    _download(site, tmp_path)
    assert ("shard_00001.parquet", "bytes=1000-") in site.requests
    assert (tmp_path / "shard_00001.parquet").read_bytes() == whole


def test_download_restarts_when_server_ignores_range(site: Site, tmp_path: Path) -> None:
    site.ranges = False
    (tmp_path / "shard_00000.parquet.part").write_bytes(b"x" * 500)
    paths = _download(site, tmp_path, shards=2)
    assert paths[0].read_bytes() == site.files["shard_00000.parquet"]


def test_download_retries_a_cut_transfer(site: Site, tmp_path: Path) -> None:
    site.cut_once.add("shard_00002.parquet")
    _download(site, tmp_path)
    asked = [rng for name, rng in site.requests if name == "shard_00002.parquet"]
    assert len(asked) == 2 and asked[0] is None and asked[1] is not None and asked[1].startswith("bytes=")
    assert (tmp_path / "shard_00002.parquet").read_bytes() == site.files["shard_00002.parquet"]


def test_download_refuses_corrupt_file(site: Site, tmp_path: Path) -> None:
    site.files["shard_00001.parquet"] = b"<html>rate limited</html>" * 40
    with pytest.raises(DataError, match=r"shard_00001\.parquet .* is not a valid shard"):
        _download(site, tmp_path)
    assert not (tmp_path / "shard_00001.parquet").exists()
    assert not (tmp_path / "shard_00001.parquet.part").exists()
    assert (tmp_path / "shard_00000.parquet").exists()  # earlier shards are kept


def test_download_refetches_corrupt_resume(site: Site, tmp_path: Path) -> None:
    whole = site.files["shard_00000.parquet"]
    (tmp_path / "shard_00000.parquet.part").write_bytes(b"garbage from another version" * 10)
    _download(site, tmp_path, shards=2)
    assert (tmp_path / "shard_00000.parquet").read_bytes() == whole
    asked = [rng for name, rng in site.requests if name == "shard_00000.parquet"]
    assert asked == ["bytes=280-", None]  # the resumed file failed verification, then a fresh fetch


def test_download_missing_shard_fails_fast(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="404"):
        _download(site, tmp_path, shards=4)
    assert [name for name, _ in site.requests].count("shard_00003.parquet") == 1
