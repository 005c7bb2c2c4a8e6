"""SHA-256 helpers shared by checkpoints, tokenizer artifacts and data shards.

Hashes are lowercase hex strings. Files are hashed in streaming chunks, so a
multi-gigabyte checkpoint never has to fit in memory. This module imports
nothing heavy (no torch), so any Pilot process can use it cheaply.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 4 * 1024 * 1024  # 4 MiB reads: large enough to stream at disk speed


def sha256_bytes(data: bytes) -> str:
    """The hex SHA-256 of an in-memory byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, *, chunk_bytes: int = CHUNK_BYTES) -> str:
    """The hex SHA-256 of a file's contents, read in ``chunk_bytes`` chunks.

    Raises ``FileNotFoundError`` / ``OSError`` as ``open`` does; callers turn
    those into their own typed error naming what the file was for.
    """
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(chunk_bytes)
        view = memoryview(buffer)
        while True:
            read = handle.readinto(buffer)
            if not read:
                break
            digest.update(view[:read])
    return digest.hexdigest()
