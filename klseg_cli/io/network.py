"""How long, how often and how much klseg waits for and reads from a remote store.

A remote read must end: a server that accepts the connection and never answers, or
trickles a byte a second, would otherwise hold a CI job until its runner's own timeout, and
an index page that never ends would be read until memory runs out. Every remote request
(``remote.py``, and the Zarr stores of ``zarrio.py``) is bounded three ways:

- ``connect``: seconds to open the connection (aiohttp's ``sock_connect``; botocore's
  ``connect_timeout`` for S3);
- ``timeout``: seconds without a byte from the server (``sock_read``; ``read_timeout``);
- a deadline for the whole request: ``connect + timeout + bytes / MIN_RATE``, so a server
  that sends, but slower than ``MIN_RATE``, is given up too.

Idempotent reads (ranged GETs, HEADs, listings) are retried ``retries`` times, with a backoff
of ``backoff · 2^i`` seconds, when the error is transient (HTTP 5xx or 429, a connection
reset or closed mid-body); a timeout is not retried (it would multiply the wait), and the
server that timed out is not asked again in the run (a dead server costs one timeout, not
one per file). After that, one ``ReadError`` names the URL and what went wrong: exit 2.

An HTTP index page (a folder given as ``https://.../``) is read up to ``index_bytes`` and
``index_links`` links; past that it is an error naming the bound and the variable to raise.

The settings come from the environment (``KLSEG_TIMEOUT``, ``KLSEG_CONNECT_TIMEOUT``,
``KLSEG_RETRIES``, ``KLSEG_RETRY_BACKOFF``, ``KLSEG_MAX_INDEX_BYTES``,
``KLSEG_MAX_INDEX_LINKS``), and the ``timeout=`` of the library functions (``--timeout``)
overrides the first. They are plain
values (``NetworkSettings``) that travel with a run's read options to worker processes and
Dask workers, which ``use`` them before reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..errors import UsageError

DEFAULT_TIMEOUT = 60.0
"""Seconds without a byte from the server before a read is given up."""
DEFAULT_CONNECT = 10.0
"""Seconds to connect to the server."""
DEFAULT_RETRIES = 3
"""Retries of an idempotent read that failed with a transient error (5xx, reset)."""
DEFAULT_BACKOFF = 0.5
"""Seconds before the first retry; doubled for each next one."""
MIN_RATE = 64 << 10
"""Bytes a second a server must at least send (64 KiB/s): a request of n bytes is given up
after ``connect + timeout + n / MIN_RATE`` seconds, however it trickles."""
DEFAULT_INDEX_BYTES = 16 << 20
"""Largest HTTP index page read (16 MiB: about 100,000 links)."""
DEFAULT_INDEX_LINKS = 100_000
"""Most links an HTTP index page may list."""

ENV = {
    "timeout": "KLSEG_TIMEOUT",
    "connect": "KLSEG_CONNECT_TIMEOUT",
    "retries": "KLSEG_RETRIES",
    "backoff": "KLSEG_RETRY_BACKOFF",
    "index_bytes": "KLSEG_MAX_INDEX_BYTES",
    "index_links": "KLSEG_MAX_INDEX_LINKS",
}


@dataclass(frozen=True)
class NetworkSettings:
    """Bounds of every remote read (see the module docstring); seconds and counts."""

    timeout: float = DEFAULT_TIMEOUT
    connect: float = DEFAULT_CONNECT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    index_bytes: int = DEFAULT_INDEX_BYTES
    index_links: int = DEFAULT_INDEX_LINKS
    run: str = ""  # which run these are (settings_for): a new run asks every server again

    def deadline(self, nbytes: int | None = None) -> float:
        """Seconds a whole request of ``nbytes`` may take (None: a small one)."""
        return self.connect + self.timeout + (nbytes or 0) / MIN_RATE

    def with_timeout(self, timeout: float | None) -> NetworkSettings:
        """These settings with ``timeout`` seconds without a byte (None: unchanged); the
        connect timeout is never longer than it."""
        if timeout is None:
            return self
        timeout = check_timeout(timeout, "--timeout")
        return replace(self, timeout=timeout, connect=min(self.connect, timeout))


def check_timeout(value, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{what} must be a positive number of seconds, got {value!r}")
    return seconds


def _count(value: str, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, got {value!r}") from None
    if n < 0:
        raise UsageError(f"{name} must not be negative, got {n}")
    return n


def from_environment(environ=None) -> NetworkSettings:
    """The defaults, changed by the ``KLSEG_*`` variables that are set."""
    environ = os.environ if environ is None else environ
    settings = NetworkSettings()
    connect = environ.get(ENV["connect"], "").strip()
    if connect:
        settings = replace(settings, connect=check_timeout(connect, ENV["connect"]))
    timeout = environ.get(ENV["timeout"], "").strip()
    if timeout:
        seconds = check_timeout(timeout, ENV["timeout"])
        settings = replace(settings, timeout=seconds)
        if not connect:
            settings = replace(settings, connect=min(settings.connect, seconds))
    backoff = environ.get(ENV["backoff"], "").strip()
    if backoff:
        try:
            seconds = float(backoff)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise UsageError(f"{ENV['backoff']} must be seconds (0 or more), got {backoff!r}")
        settings = replace(settings, backoff=seconds)
    for field in ("retries", "index_bytes", "index_links"):
        text = environ.get(ENV[field], "").strip()
        if text:
            settings = replace(settings, **{field: _count(text, ENV[field])})
    return settings


_current: NetworkSettings | None = None


def current() -> NetworkSettings:
    """The settings remote reads in this process use now."""
    global _current
    if _current is None:
        _current = from_environment()
    return _current


_listeners: list = []


def on_change(callback) -> None:
    """Call ``callback()`` whenever ``use`` changes the settings (``remote.py`` registers
    itself: its clients are configured when made, and it remembers servers that timed out)."""
    _listeners.append(callback)


def use(settings: NetworkSettings | None) -> None:
    """Make ``settings`` this process's (None: back to the environment's). A worker calls
    this with the settings its task carries before it reads."""
    global _current
    if settings != _current:
        _current = settings
        for callback in _listeners:
            callback()


def settings_for(timeout: float | None = None) -> NetworkSettings:
    """A new run's settings: the environment's, with ``timeout`` (``--timeout``) applied.

    Each call is a new ``run``: a server that timed out is not asked again within a run
    (its tasks, on any worker, carry the same settings), but is in the next one."""
    import uuid

    return replace(from_environment().with_timeout(timeout), run=uuid.uuid4().hex)


# --- the clients' options and their errors (remote.py and the Zarr stores of zarrio.py) ---


PROTOCOLS = ("s3", "gs", "gcs", "http", "https", "memory", "file")
"""URL schemes klseg opens through fsspec (others, e.g. ftp://, need arguments a URL lacks)."""


def _client_timeout(settings: NetworkSettings):
    import aiohttp

    return aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect, sock_read=settings.timeout
    )


def storage_options(protocol: str) -> dict:
    """fsspec options that give ``protocol``'s client the timeouts of ``current()``,
    merged over what fsspec's own configuration sets for it (Zarr stores use them too)."""
    import fsspec.config

    settings = current()
    conf = fsspec.config.conf.get(protocol, {})
    if protocol in ("http", "https"):
        client = {**conf.get("client_kwargs", {}), "timeout": _client_timeout(settings)}
        return {"client_kwargs": client}
    if protocol == "s3":  # botocore retries 5xx and resets with its backoff
        config = {
            **conf.get("config_kwargs", {}),
            "connect_timeout": settings.connect,
            "read_timeout": settings.timeout,
            "retries": {"max_attempts": settings.retries + 1, "mode": "standard"},
        }
        return {"config_kwargs": config}
    if protocol in ("gs", "gcs"):  # gcsfs hands session_kwargs to its aiohttp session
        session = {**conf.get("session_kwargs", {}), "timeout": _client_timeout(settings)}
        return {"session_kwargs": session}
    return {}


class _TooLongError(Exception):
    """A body went past the bytes klseg asked for (``read``: how many had come by then)."""

    def __init__(self, read: int) -> None:
        super().__init__(read)
        self.read = read


def _chain(err: BaseException):
    """``err`` and its causes (fsspec wraps a failed HEAD in FileNotFoundError)."""
    seen: BaseException | None = err
    for _ in range(6):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


_TIMEOUT_NAMES = ("FSTimeoutError", "ReadTimeoutError", "ConnectTimeoutError")


def _is_timeout(err: BaseException) -> bool:
    return any(
        isinstance(e, TimeoutError) or type(e).__name__ in _TIMEOUT_NAMES for e in _chain(err)
    )


def _timeout_message(err: BaseException, deadline: float) -> str:
    settings = current()
    hint = "--timeout or KLSEG_TIMEOUT gives a slow store longer"
    for e in _chain(err):
        name = type(e).__name__
        if name in ("ConnectionTimeoutError", "ConnectTimeoutError"):
            return f"timed out: no connection within {settings.connect:g} s ({hint})"
        if name in ("SocketTimeoutError", "ReadTimeoutError"):
            return f"timed out: no data from the server for {settings.timeout:g} s ({hint})"
    return (
        f"timed out: the server did not send the answer within {deadline:.3g} s (it stalls or "
        f"sends slower than {MIN_RATE >> 10} KiB/s; {hint})"
    )


def _is_transient(err: BaseException) -> bool:
    """An error worth retrying an idempotent read for: HTTP 5xx or 429, a connection reset,
    a body cut short. Timeouts are not (a retry would multiply the wait)."""
    if _is_timeout(err):
        return False
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    if isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return True
    name = type(err).__name__
    if name in ("ClientPayloadError", "ServerDisconnectedError", "ContentLengthError"):
        return True
    return name == "ClientOSError" and getattr(err, "errno", None) in (32, 103, 104)


def _describe(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such object"
    if isinstance(err, PermissionError):
        return f"access denied ({err})"
    status = getattr(err, "status", None)
    if isinstance(status, int) and type(err).__name__ == "ClientResponseError":
        return f"cannot read (HTTP {status} {getattr(err, 'message', '')})".replace(" )", ")")
    return f"cannot read ({type(err).__name__}: {err})"
