"""Getting the tokenizer from the Tokenizer gRPC service instead of a shared disk.

``fetch_tokenizer(address, *, sha256=None, name="", cache_dir, tls=None)``
returns a local artifact directory (``cache_dir/<sha256>/tokenizer.json``) that
``load_tokenizer`` opens. The cache is content-addressed by the sha256 of the
``tokenizer.json`` bytes (the digest the service sends):

- ``sha256`` given and already cached (bytes verified): returned at once, no call.
- otherwise ``GetTokenizer`` is called, with ``if_none_match`` set to the copy
  this (address, name) last gave when it is still in the cache; a
  ``not_modified`` answer returns that copy.
- a new artifact is verified twice before it is kept: the bytes must hash to
  the sha256 the server sent (and to ``sha256`` when given), and the JSON must
  pass ``read_artifact``'s own content checksum. Then it is written into a
  staging directory, fsync'd and renamed into place, so a reader never sees a
  partial file and a crash leaves no half-written entry.

Errors: an unreachable server (UNAVAILABLE, DEADLINE_EXCEEDED) raises
:class:`~pilot.errors.RetryableError`; a refused or tampered answer raises
:class:`~pilot.errors.TokenizerError` naming the digests.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import grpc

from pilot.errors import RetryableError, TokenizerError
from pilot.grpc_util import TLSConfig, make_channel
from pilot.hashing import sha256_bytes, sha256_file
from pilot.log import get_logger
from pilot.tokenizer import ARTIFACT_FILE, read_artifact
from pilot.v1 import services_pb2 as svc
from pilot.v1 import services_pb2_grpc as svc_grpc

log = get_logger(__name__)

DEFAULT_TIMEOUT_S = 30.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def fetch_tokenizer(
    address: str,
    *,
    sha256: str | None = None,
    name: str = "",
    cache_dir: str | Path,
    tls: TLSConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """A verified local copy of the tokenizer served at ``address``; returns its directory.

    ``sha256``: the expected digest of the ``tokenizer.json`` bytes (pins the
    artifact). ``name``: the served tokenizer's name, or "" for the default.
    """
    cache = Path(cache_dir).expanduser().resolve()
    if sha256 is not None and not _SHA256_RE.match(sha256):
        raise TokenizerError(f"expected sha256 {sha256!r} is not 64 lowercase hex digits")
    if sha256 is not None and _cached(cache, sha256):
        return cache / sha256
    pointer = _pointer(cache, address, name)
    known = _read_pointer(pointer)
    if_none_match = known if known is not None and _cached(cache, known) else ""
    reply = _get(address, svc.GetTokenizerRequest(name=name, if_none_match=if_none_match), tls, timeout_s)
    if reply.not_modified:
        if not if_none_match or reply.sha256 != if_none_match:
            raise TokenizerError(
                f"tokenizer service at {address} answered not_modified for sha256 {reply.sha256!r}, "
                f"but this client asked about {if_none_match or 'nothing'}"
            )
        _check_pin(reply.sha256, sha256, address)
        return cache / reply.sha256
    verified = _verified(reply, sha256, address)
    try:
        directory = _store(cache, verified)
    except TokenizerError as exc:
        raise TokenizerError(f"tokenizer from {address} refused: {exc}") from None
    _write_pointer(pointer, reply.sha256)
    log.info("tokenizer fetched", address=address, name=reply.name, sha256=reply.sha256,
             vocab_size=reply.vocab_size, path=str(directory))
    return directory


def _get(address: str, request: svc.GetTokenizerRequest, tls: TLSConfig | None, timeout_s: float
         ) -> svc.TokenizerArtifact:
    with make_channel(address, tls) as channel:
        try:
            reply: svc.TokenizerArtifact = svc_grpc.TokenizerStub(channel).GetTokenizer(
                request, timeout=timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            code, details = (exc.code(), exc.details()) if isinstance(exc, grpc.Call) else (None, str(exc))
            message = f"GetTokenizer from {address} failed: {code}: {details}"
            raise (RetryableError(message) if code in _RETRYABLE else TokenizerError(message)) from exc
    return reply


def _check_pin(got: str, pinned: str | None, address: str) -> None:
    if pinned is not None and got != pinned:
        raise TokenizerError(f"tokenizer service at {address} serves sha256 {got}, expected {pinned}")


def _verified(reply: svc.TokenizerArtifact, pinned: str | None, address: str) -> tuple[str, bytes]:
    """(sha256, bytes) of a reply whose artifact hashes to what the server says (and the pin)."""
    if not _SHA256_RE.match(reply.sha256):
        raise TokenizerError(f"tokenizer service at {address} sent a malformed sha256 {reply.sha256!r}")
    actual = sha256_bytes(reply.artifact)
    if actual != reply.sha256:
        raise TokenizerError(
            f"tokenizer from {address} fails its checksum: {len(reply.artifact):,} bytes hash to {actual}, "
            f"the server said {reply.sha256}; refusing a tampered or corrupt artifact"
        )
    _check_pin(actual, pinned, address)
    return actual, reply.artifact


def _cached(cache: Path, sha256: str) -> bool:
    """True when ``cache/<sha256>/tokenizer.json`` exists with exactly those bytes."""
    file = cache / sha256 / ARTIFACT_FILE
    try:
        return file.is_file() and sha256_file(file) == sha256
    except OSError:
        return False


def _store(cache: Path, verified: tuple[str, bytes]) -> Path:
    """Write the artifact into ``cache/<sha256>/`` atomically (staging dir, fsync, rename)."""
    sha256, data = verified
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / sha256
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{sha256[:12]}.", suffix=".tmp"))
    try:
        file = staging / ARTIFACT_FILE
        with open(file, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        read_artifact(file)  # the content checksum, on the exact bytes that will be kept
        if final.exists() and not _cached(cache, sha256):  # a corrupt entry (a good one returns early)
            shutil.rmtree(final)
        try:
            os.rename(staging, final)
        except OSError:
            if not _cached(cache, sha256):  # else another process stored the same bytes meanwhile
                raise
        _fsync_dir(cache)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _pointer(cache: Path, address: str, name: str) -> Path:
    """The file remembering which sha256 (address, name) gave last (a hint for if_none_match)."""
    return cache / f".current-{sha256_bytes(f'{address}|{name}'.encode())[:16]}"


def _read_pointer(pointer: Path) -> str | None:
    try:
        value = pointer.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if _SHA256_RE.match(value) else None


def _write_pointer(pointer: Path, sha256: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=pointer.parent, prefix=".pointer.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(sha256 + "\n")
        os.replace(tmp, pointer)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
