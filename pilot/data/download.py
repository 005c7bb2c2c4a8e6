"""Download FineWeb-EDU shards (``pilot data download``).

Fetches ``shard_XXXXX.parquet`` from ``karpathy/fineweb-edu-100b-shuffle`` on
the Hugging Face hub into ``out_dir``:

- resumable: a shard already present and readable is skipped; bytes arrive in
  ``shard_XXXXX.parquet.part`` and continue from where they stopped with an
  HTTP ``Range`` request (a server that ignores it restarts the file);
- retried with exponential backoff (tenacity) on connection errors, cut
  transfers, timeouts and 5xx/429 answers; a 404 fails at once;
- verified: each finished file must decode as parquet with a ``text`` column
  (every row group is read) before it is renamed into place; a resumed file that fails is fetched once
  more from scratch, then the shard fails with ``DataError``.

As with nanochat, the last downloaded shard serves as the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pilot.data.shards import open_shard, read_row_group, shard_name
from pilot.errors import DataError, RetryableError
from pilot.log import get_logger

log = get_logger(__name__)

FINEWEB_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_MAX_SHARD = 1822  # shard_01822 is the last one of the dataset
CHUNK_BYTES = 1 << 16  # small enough that a cut transfer keeps almost all it received

# (bytes done in this shard, total bytes or None) -> None; used for progress bars.
ByteCallback = Callable[[int, int | None], None]


def verify_shard(path: Path) -> None:
    """Decode every row group's ``text`` column: a cut or spliced file fails here
    even when its footer (all that ``open_shard`` reads) happens to be intact."""
    parquet = open_shard(path)
    for row_group in range(parquet.metadata.num_row_groups):
        read_row_group(path, row_group, parquet=parquet)


def _is_complete(path: Path) -> bool:
    """A shard already here counts as done when its footer reads (cheap, no full decode)."""
    if not path.is_file():
        return False
    try:
        open_shard(path)
    except DataError:
        return False
    return True


def _fetch_once(url: str, part: Path, *, timeout_s: float, on_bytes: ByteCallback | None) -> None:
    """One HTTP attempt, appending to ``part`` from its current size."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
            if response.status_code == 416 and have:  # asked past the end: the .part is already whole
                return
            if response.status_code == 404:
                raise DataError(f"{url} does not exist (HTTP 404)")
            if response.status_code == 429 or response.status_code >= 500:
                raise RetryableError(f"{url} answered HTTP {response.status_code}")
            if response.status_code not in (200, 206):
                raise DataError(f"{url} answered HTTP {response.status_code}")
            resumed = response.status_code == 206
            if not resumed:
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as handle:
                done = have
                for chunk in response.iter_content(CHUNK_BYTES):
                    handle.write(chunk)
                    done += len(chunk)
                    if on_bytes is not None:
                        on_bytes(done, total)
                handle.flush()
            if total is not None and done != total:
                raise RetryableError(f"{url}: transfer stopped at {done} of {total} bytes")
    except requests.RequestException as exc:  # connection reset, cut body, timeout
        raise RetryableError(f"{url}: {exc.__class__.__name__}: {exc}") from None


def download_shard(
    url: str,
    target: Path,
    *,
    max_attempts: int = 5,
    retry_base_s: float = 2.0,
    timeout_s: float = 60.0,
    on_bytes: ByteCallback | None = None,
) -> Path:
    """Fetch ``url`` into ``target`` (resumable, retried, verified); returns ``target``."""
    from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

    part = target.with_name(target.name + ".part")
    fetch = retry(
        retry=retry_if_exception_type(RetryableError),
        stop=stop_after_attempt(max_attempts),
        wait=wait_exponential(multiplier=retry_base_s, max=60 * retry_base_s),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "download retry",
            url=url,
            attempt=state.attempt_number,
            error=str(state.outcome.exception()) if state.outcome else None,
        ),
    )(_fetch_once)

    resumed = part.exists()
    for fresh_try in (False, True):
        try:
            fetch(url, part, timeout_s=timeout_s, on_bytes=on_bytes)
        except RetryableError as exc:
            raise DataError(f"download of {target.name} failed after {max_attempts} attempts: {exc}") from None
        try:
            verify_shard(part)
        except DataError as exc:
            part.unlink(missing_ok=True)
            if resumed and not fresh_try:
                log.warning("resumed download is corrupt; fetching again", shard=target.name)
                continue
            raise DataError(f"downloaded {target.name} from {url} is not a valid shard: {exc}") from None
        part.replace(target)
        return target
    raise AssertionError("unreachable")


def download_fineweb(
    out_dir: str | Path,
    num_shards: int,
    *,
    base_url: str = FINEWEB_BASE_URL,
    first_shard: int = 0,
    max_attempts: int = 5,
    retry_base_s: float = 2.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Download shards ``first_shard … first_shard+num_shards-1`` into ``out_dir``.

    Returns the shard paths (the last one is the validation split). Complete
    files are skipped, so re-running after an interruption only fetches the rest.
    """
    if num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}")
    last = first_shard + num_shards - 1
    if first_shard < 0 or (base_url == FINEWEB_BASE_URL and last > FINEWEB_MAX_SHARD):
        raise DataError(f"FineWeb-EDU has shards 0..{FINEWEB_MAX_SHARD}; asked for {first_shard}..{last}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [shard_name(i) for i in range(first_shard, last + 1)]
    todo = [name for name in names if not _is_complete(out / name)]
    log.info("download shards", out_dir=str(out), wanted=len(names), missing=len(todo))

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        for number, name in enumerate(todo, start=1):
            task = bar.add_task(f"[{number}/{len(todo)}] {name}", total=None)

            def on_bytes(done: int, total: int | None, task: TaskID = task) -> None:
                bar.update(task, completed=done, total=total)

            download_shard(
                f"{base_url.rstrip('/')}/{name}",
                out / name,
                max_attempts=max_attempts,
                retry_base_s=retry_base_s,
                timeout_s=timeout_s,
                on_bytes=on_bytes,
            )
    return [out / name for name in names]
