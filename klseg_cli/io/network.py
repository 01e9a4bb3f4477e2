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


def use(settings: NetworkSettings | None) -> None:
    """Make ``settings`` this process's (None: back to the environment's). A worker calls
    this with the settings its task carries before it reads."""
    global _current
    if settings != _current:
        from .remote import forget_timeouts, reset_filesystems

        _current = settings
        reset_filesystems()  # clients are configured when made: make new ones
        forget_timeouts()  # a new run gives every server a new chance


def settings_for(timeout: float | None = None) -> NetworkSettings:
    """A new run's settings: the environment's, with ``timeout`` (``--timeout``) applied.

    Each call is a new ``run``: a server that timed out is not asked again within a run
    (its tasks, on any worker, carry the same settings), but is in the next one."""
    import uuid

    return replace(from_environment().with_timeout(timeout), run=uuid.uuid4().hex)
