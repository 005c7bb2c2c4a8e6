"""Connecting to Redis: one client factory, clear errors, bounded reconnects.

- :func:`redis_client` builds a ``redis.Redis`` from a URL (``redis://`` or
  ``rediss://`` for TLS; the password in the URL, as ``password=``, or via
  ``$PILOT_REDIS_URL``) with connect/read timeouts and a health check, and
  PINGs it once so a wrong password fails at once with :class:`RedisAuthError`
  instead of hanging or failing later.
- :class:`RetryPolicy` wraps Redis calls that may meet a restarting server:
  exponential backoff (tenacity), bounded in time; after the bound it raises
  :class:`RedisUnavailable` (a :class:`~pilot.errors.RetryableError`) naming
  the server and what was being done. Auth errors are never retried.

The client is a *bytes* client (``decode_responses=False``): stream entries
carry protobuf bytes. Callers decode text fields themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from pilot.errors import ConfigError, PilotError, RetryableError

REDIS_URL_ENV = "PILOT_REDIS_URL"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
"""How long a TCP/TLS connect may take before the attempt fails."""
DEFAULT_SOCKET_TIMEOUT_S = 30.0
"""How long any one reply may take; blocking reads (XREAD BLOCK) stay well below it."""
HEALTH_CHECK_INTERVAL_S = 15
"""A pooled connection idle longer than this is PINGed before reuse."""

T = TypeVar("T")


class RedisAuthError(PilotError):
    """Redis refused the credentials (wrong or missing password)."""


class RedisUnavailable(RetryableError):
    """Redis could not be reached within the retry policy's bound."""


def where(client: redis.Redis) -> str:
    """``host:port/db`` of a client, without credentials (for messages)."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix:{kw['path']}"
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError))


def auth_error(exc: BaseException, target: str) -> RedisAuthError:
    return RedisAuthError(
        f"Redis at {target} refused the credentials ({exc}); put the password in the URL "
        f"(redis://:PASSWORD@host:port/0) or ${REDIS_URL_ENV}"
    )


def redis_client(
    url: str | None = None,
    password: str | None = None,
    *,
    ca_certs: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    check: bool = True,
) -> redis.Redis:
    """A bytes Redis client for ``url`` (default ``$PILOT_REDIS_URL``).

    ``password`` overrides the URL's. ``ca_certs``/``certfile``/``keyfile`` apply
    to ``rediss://`` URLs (server CA, client cert for mutual TLS). With
    ``check`` (default) the server is PINGed once: a wrong password raises
    :class:`RedisAuthError`, an unreachable server :class:`RedisUnavailable`.
    """
    url = url or os.environ.get(REDIS_URL_ENV)
    if not url:
        raise ConfigError(f"no Redis URL: pass one (e.g. --redis redis://:PASSWORD@host:6379/0) or set ${REDIS_URL_ENV}")
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"Redis URL {redact(url)!r}: scheme must be redis://, rediss:// or unix://")
    kwargs: dict[str, object] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": socket_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # One immediate reconnect for a stale pooled connection; longer outages
        # are handled (bounded, with backoff) by RetryPolicy.
        "retry": Retry(NoBackoff(), 1),
        "decode_responses": False,
    }
    if password is not None:
        kwargs["password"] = password
    if scheme == "rediss":
        tls_files = {"ssl_ca_certs": ca_certs, "ssl_certfile": certfile, "ssl_keyfile": keyfile}
        kwargs.update({k: v for k, v in tls_files.items() if v})
    try:
        client = redis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact(url)!r}: {exc}") from exc
    if check:
        target = where(client)
        try:
            client.ping()
        except redis.RedisError as exc:
            if _is_auth_error(exc):
                raise auth_error(exc, target) from exc
            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                raise RedisUnavailable(f"cannot reach Redis at {target}: {exc}") from exc
            raise
    return client


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and not _is_auth_error(exc)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for calls that may meet a restarting Redis."""

    max_elapsed_s: float = 30.0  # give up (RedisUnavailable) after this long
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def call(self, client: redis.Redis, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a Redis call), retrying connection errors within the bound."""
        retrying = Retrying(
            stop=stop_after_delay(self.max_elapsed_s),
            wait=wait_exponential(multiplier=self.initial_backoff_s, max=self.max_backoff_s),
            retry=retry_if_exception(_transient),
            reraise=False,
        )
        try:
            return retrying(fn)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise RedisUnavailable(
                f"Redis at {where(client)} unreachable for {self.max_elapsed_s:g}s while {what}: {last}"
            ) from last
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            raise auth_error(exc, where(client)) from exc
