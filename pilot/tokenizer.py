"""The tokenizer interface, the byte and char tokenizers, and artifact loading.

Every tokenizer Pilot uses (byte, char, and the Rust-trained BPE in
``pilot.bpe``) implements the ``Tokenizer`` protocol below, so the model, the
data loader and the evaluator never care which one they got:

- ``name``, ``vocab_size``, ``bos_id``, ``sha256`` (identity, stored in
  checkpoint metadata so a checkpoint is never scored with another tokenizer);
- ``encode(text)`` (no BOS added, special-token text is encoded as plain text),
  ``encode_batch(texts, num_threads=...)``, ``decode(ids)``;
- ``token_bytes()``: int64 tensor [vocab_size], the UTF-8 byte length each id
  stands for, 0 for special tokens (bits-per-byte divides by this);
- ``save(dir)``: write the artifact described next.

Artifact convention (every kind follows it)
-------------------------------------------
An artifact is a directory holding ``tokenizer.json``: a JSON object with

- ``"kind"``: ``"byte"`` | ``"char"`` | ``"bpe"`` (``load_tokenizer`` dispatches on it);
- ``"version"``: integer format version of that kind;
- ``"sha256"``: ``canonical_sha256(obj)``: the hex SHA-256 of the object *without*
  its ``"sha256"`` key, serialised as ``json.dumps(obj, sort_keys=True,
  ensure_ascii=True, separators=(",", ":"))`` and encoded as ASCII. It is
  independent of indentation, and it is the tokenizer's ``sha256`` identity;
- whatever else the kind needs. A kind that keeps data in further files of the
  directory records each file's sha256 inside ``tokenizer.json`` so the single
  top-level digest covers everything.

``write_artifact(dir, obj)`` adds the digest and writes atomically;
``read_artifact(path)`` finds ``tokenizer.json`` (``path`` may be the directory
or the file), parses it and refuses a tampered one with ``TokenizerError``.
For ``"bpe"``, ``load_tokenizer`` calls ``pilot.bpe.BPETokenizer.load(dir)``
(imported lazily) with the artifact's directory; that class verifies its own
artifact. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pilot.errors import TokenizerError
from pilot.hashing import sha256_bytes

if TYPE_CHECKING:
    import torch

ARTIFACT_FILE = "tokenizer.json"
BOS = "<|bos|>"
# nanochat's special tokens, in nanochat's order (BOS first).
NANOCHAT_SPECIALS: tuple[str, ...] = (
    BOS,
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
DEFAULT_THREADS = 4


@runtime_checkable
class Tokenizer(Protocol):
    """What every Pilot tokenizer provides (see the module docstring)."""

    name: str
    vocab_size: int
    bos_id: int
    sha256: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = DEFAULT_THREADS) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self) -> torch.Tensor: ...

    def save(self, directory: str | Path) -> Path: ...


# --- artifact helpers (shared with pilot.bpe) ---------------------------------


def canonical_sha256(obj: Mapping[str, Any]) -> str:
    """The digest of an artifact object, excluding its own ``"sha256"`` key."""
    body = {key: value for key, value in obj.items() if key != "sha256"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return sha256_bytes(text.encode("ascii"))


def write_artifact(directory: str | Path, obj: Mapping[str, Any]) -> Path:
    """Write ``obj`` (with its sha256 added) as ``directory/tokenizer.json``, atomically."""
    if "kind" not in obj:
        raise TokenizerError("a tokenizer artifact needs a 'kind' field")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = dict(obj)
    payload["sha256"] = canonical_sha256(payload)
    target = directory / ARTIFACT_FILE
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".tokenizer.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1, ensure_ascii=False, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target


def artifact_file(path: str | Path) -> Path:
    """``path/tokenizer.json`` for a directory, ``path`` itself for a file."""
    path = Path(path)
    if path.is_dir():
        path = path / ARTIFACT_FILE
    if not path.is_file():
        raise TokenizerError(f"no tokenizer artifact at {path}")
    return path


def read_json_artifact(path: str | Path) -> dict[str, Any]:
    """Parse an artifact's JSON (no digest check); it must have a string ``kind``."""
    file = artifact_file(path)
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"tokenizer artifact {file} is not readable JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise TokenizerError(f"tokenizer artifact {file} has no 'kind' field")
    return obj


def read_artifact(path: str | Path) -> dict[str, Any]:
    """Parse an artifact and verify its sha256; a tampered one raises TokenizerError."""
    obj = read_json_artifact(path)
    recorded = obj.get("sha256")
    actual = canonical_sha256(obj)
    if recorded != actual:
        raise TokenizerError(
            f"tokenizer artifact {artifact_file(path)} fails its checksum "
            f"(recorded sha256 {recorded!r}, content hashes to {actual}): it was modified or is corrupt"
        )
    return obj


# --- byte tokenizer -------------------------------------------------------------


class _SimpleTokenizer:
    """Behaviour shared by the in-process tokenizers (byte, char)."""

    name: str
    vocab_size: int
    bos_id: int
    sha256: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = DEFAULT_THREADS) -> list[list[int]]:
        """Encode many texts (``num_threads`` is accepted for the interface; encoding is cheap)."""
        return [self.encode(text) for text in texts]

    def _check_ids(self, ids: Sequence[int]) -> None:
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise TokenizerError(f"token id {token} is outside {self.name}'s vocabulary (0..{self.vocab_size - 1})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(_SimpleTokenizer):
    """UTF-8 bytes as ids 0..255, then nanochat's nine special tokens (BOS = 256)."""

    KIND = "byte"
    VERSION = 1

    def __init__(self, specials: Sequence[str] = NANOCHAT_SPECIALS) -> None:
        if not specials or specials[0] != BOS or len(set(specials)) != len(specials):
            raise TokenizerError(f"byte tokenizer specials must be unique and start with {BOS}")
        self.specials = tuple(specials)
        self.special_ids = {token: 256 + index for index, token in enumerate(self.specials)}
        self.name = "byte"
        self.vocab_size = 256 + len(self.specials)
        self.bos_id = self.special_ids[BOS]
        self.sha256 = canonical_sha256(self._artifact())

    def _artifact(self) -> dict[str, Any]:
        return {"kind": self.KIND, "version": self.VERSION, "special_tokens": list(self.specials)}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes decoded with errors="replace"; specials appear as their text."""
        self._check_ids(ids)
        parts: list[str] = []
        run = bytearray()
        for token in ids:
            if token < 256:
                run.append(token)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(self.specials[token - 256])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_bytes(self) -> torch.Tensor:
        import torch

        counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        counts[:256] = 1
        return counts

    def save(self, directory: str | Path) -> Path:
        return write_artifact(directory, self._artifact())

    @classmethod
    def from_artifact(cls, obj: Mapping[str, Any]) -> ByteTokenizer:
        specials = obj.get("special_tokens")
        if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
            raise TokenizerError("byte tokenizer artifact needs a list of 'special_tokens'")
        return cls(specials)


# --- char tokenizer -------------------------------------------------------------


class CharTokenizer(_SimpleTokenizer):
    """One id per character of a fixed alphabet (sorted), then ``<|bos|>``.

    Built from a text's sorted set of characters: Tiny Shakespeare gives 65
    symbols, so ids 0..64 are characters and 65 is BOS (vocab 66).
    """

    KIND = "char"
    VERSION = 1

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise TokenizerError("a char tokenizer needs at least one character")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise TokenizerError(f"char tokenizer symbols must be single characters, got {bad[0]!r}")
        if len(set(chars)) != len(chars):
            raise TokenizerError("char tokenizer symbols must be unique")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        self.name = f"char{len(chars)}"
        self.bos_id = len(chars)
        self.vocab_size = len(chars) + 1
        self.sha256 = canonical_sha256(self._artifact())

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The alphabet of ``text`` (sorted by code point)."""
        if not text:
            raise TokenizerError("cannot build a char tokenizer from empty text")
        return cls(sorted(set(text)))

    def _artifact(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "version": self.VERSION,
            "chars": self.chars,
            "special_tokens": {BOS: self.bos_id},
        }

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as exc:
            char = exc.args[0]
            raise TokenizerError(
                f"character {char!r} (U+{ord(char):04X}) is not in the vocabulary of {self.name} "
                f"(tokenizer {self.sha256[:12]})"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        self._check_ids(ids)
        chars, bos = self.chars, self.bos_id
        return "".join(BOS if token == bos else chars[token] for token in ids)

    def token_bytes(self) -> torch.Tensor:
        import torch

        lengths = [len(c.encode("utf-8")) for c in self.chars] + [0]
        return torch.tensor(lengths, dtype=torch.int64)

    def save(self, directory: str | Path) -> Path:
        return write_artifact(directory, self._artifact())

    @classmethod
    def from_artifact(cls, obj: Mapping[str, Any]) -> CharTokenizer:
        chars = obj.get("chars")
        if not isinstance(chars, list):
            raise TokenizerError("char tokenizer artifact needs a 'chars' list")
        tokenizer = cls(chars)
        if obj.get("special_tokens") != {BOS: tokenizer.bos_id}:
            raise TokenizerError(f"char tokenizer artifact must map {BOS} to id {tokenizer.bos_id}")
        return tokenizer


# --- loading --------------------------------------------------------------------


def load_tokenizer(
    spec: str | Path, *, text_for_char: str | None = None, expected_sha256: str | None = None
) -> Tokenizer:
    """A tokenizer from ``spec``: ``"byte"``, ``"char"`` (built from ``text_for_char``),
    or a path to an artifact directory / ``tokenizer.json`` file.

    ``expected_sha256`` (e.g. from checkpoint metadata) must match when given.
    """
    tokenizer: Tokenizer
    if spec == "byte":
        tokenizer = ByteTokenizer()
    elif spec == "char":
        if text_for_char is None:
            raise TokenizerError("tokenizer 'char' needs the training text to build its alphabet")
        tokenizer = CharTokenizer.from_text(text_for_char)
    else:
        path = Path(spec)
        if not path.exists():
            raise TokenizerError(f"unknown tokenizer {str(spec)!r}: not 'byte', 'char' or an existing artifact path")
        tokenizer = _load_artifact(path)
    if expected_sha256 is not None and tokenizer.sha256 != expected_sha256:
        raise TokenizerError(f"tokenizer {tokenizer.name} has sha256 {tokenizer.sha256}, expected {expected_sha256}")
    return tokenizer


def _load_artifact(path: Path) -> Tokenizer:
    kind = read_json_artifact(path)["kind"]
    directory = artifact_file(path).parent
    if kind == CharTokenizer.KIND:
        return CharTokenizer.from_artifact(read_artifact(path))
    if kind == ByteTokenizer.KIND:
        return ByteTokenizer.from_artifact(read_artifact(path))
    if kind == "bpe":
        try:
            from pilot.bpe import BPETokenizer  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise TokenizerError(f"BPE tokenizer support is unavailable ({exc}); cannot load {path}") from None
        loaded: Tokenizer = BPETokenizer.load(directory)
        return loaded
    raise TokenizerError(f"tokenizer artifact {path} has unknown kind {kind!r} (expected byte, char or bpe)")
