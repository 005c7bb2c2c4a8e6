"""Type stub for pilot_rustbpe, Pilot's BPE trainer written in Rust (see src/lib.rs)."""

from collections.abc import Callable, Iterable, Sequence
from os import PathLike

GPT4_PATTERN: str
__version__: str

class Trainer:
    """Counts text from any mix of sources, then learns BPE merges once."""

    def __init__(
        self,
        pattern: str | None = None,
        doc_cap: int | None = None,
        max_chars: int | None = None,
        threads: int | None = None,
    ) -> None: ...
    @property
    def pattern(self) -> str: ...
    @property
    def docs(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def chars(self) -> int: ...
    @property
    def full(self) -> bool: ...
    def feed(
        self,
        texts: Iterable[str],
        buffer_size: int = 8192,
        progress: Callable[[int], object] | None = None,
    ) -> None: ...
    def feed_file(
        self,
        path: str | PathLike[str],
        stop: int | None = None,
        progress: Callable[[str, int], object] | None = None,
    ) -> None: ...
    def feed_arrow(self, offsets: object, data: object) -> None: ...
    def train(
        self, vocab_size: int, progress: Callable[[int, int], object] | None = None
    ) -> list[tuple[bytes, int]]: ...

class Encoder:
    """Encodes text with mergeable ranks exactly as tiktoken does."""

    def __init__(self, mergeable_ranks: Sequence[tuple[bytes, int]], pattern: str | None = None) -> None: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

def split(text: str, pattern: str | None = None) -> list[str]: ...
