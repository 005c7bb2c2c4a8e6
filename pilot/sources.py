"""Small public text sources that Pilot fetches on first use.

Today that is Tiny Shakespeare (the classic char-rnn ``input.txt``, about 1 MB),
the default data of ``make run`` and of the ``shakespeare`` task. The file is
cached under ``$PILOT_BASE_DIR/data/tinyshakespeare/input.txt``, written
atomically and checked against its known size and sha256, so a cut download is
never mistaken for the real file. On a machine without internet the fetch fails
fast with a message saying how to point Pilot at local text instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pilot.errors import DataError
from pilot.hashing import sha256_file
from pilot.paths import data_dir

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_BYTES = 1_115_394
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def tiny_shakespeare(cache_dir: Path | None = None, *, url: str = TINY_SHAKESPEARE_URL, timeout_s: float = 10.0) -> Path:
    """Path of Tiny Shakespeare, downloading it once into the cache if needed."""
    import requests

    target = (cache_dir or data_dir() / "tinyshakespeare") / "input.txt"
    if target.is_file() and target.stat().st_size == TINY_SHAKESPEARE_BYTES:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        response = requests.get(url, timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise DataError(
            f"could not download Tiny Shakespeare from {url} ({exc.__class__.__name__}). "
            "Without internet, point Pilot at local text: make run DATA=path/to/text.txt "
            "(or --data PATH)."
        ) from None
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".input.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(response.content)
            handle.flush()
            os.fsync(handle.fileno())
        if sha256_file(tmp) != TINY_SHAKESPEARE_SHA256:
            raise DataError(f"downloaded Tiny Shakespeare from {url} does not match its known sha256")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


NAMED_SOURCES = {"shakespeare": tiny_shakespeare}


def resolve_named_source(data: str | Path) -> Path:
    """``data`` as a path; a known name (``shakespeare``) that is not a local path is fetched on first use."""
    path = Path(data).expanduser()
    if not path.exists() and str(data) in NAMED_SOURCES:
        return NAMED_SOURCES[str(data)]()
    return path
