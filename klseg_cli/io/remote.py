"""Inputs named by URL (``s3://``, ``gs://``, ``https://``, ``memory://``...) through fsspec.

A ``RemotePath`` stands where a ``pathlib.Path`` stands for a local file: pairing lists a
remote folder through it (``iterdir``, ``is_file``), and the readers ask it for bytes. A
remote ``.npy`` prediction is never downloaded whole: its header is read, its size checked
against the header (a truncated object is an error before any work), and then every chunk
the core asks for is one range request (``RemoteNpy.elements``), so memory is bounded by the
chunk as for a local file. Targets (label masks) are small and read whole. ``file://`` URLs
are plain local paths (the local readers, with ``pread``, are faster than fsspec's).

fsspec and the protocol's own package (s3fs, gcsfs...) are the optional extra
``klseg[cloud]``; a URL without them is one usage error naming the extra. Credentials and
endpoints come from fsspec's usual configuration (e.g. ``FSSPEC_S3_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``) — klseg adds only the bounds of ``network.py``: every request has a
connect timeout, an idle-read timeout and a deadline; transient errors (5xx, resets) of
these idempotent reads are retried with a backoff; and nothing is read past what was asked
(a range, a small object's limit, an index page's bound). Over http(s) klseg makes its
requests itself, on fsspec's aiohttp session, so that a body is read in blocks and dropped
past its bound; other protocols go through their fsspec implementation, configured with
the same timeouts (``storage_options``).
"""

from __future__ import annotations

import io
import math
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urldefrag, urljoin

import numpy as np

from ..errors import InputError, ReadError, UsageError
from . import network
from .network import (  # the clients' options and errors (zarrio.py uses them too)
    PROTOCOLS,
    _describe,
    _is_timeout,
    _is_transient,
    _timeout_message,
    _TooLongError,
    storage_options,
)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
EXTRA_HINT = "pip install 'klseg[cloud]' (fsspec and s3fs; gcsfs for gs://)"
MAX_TARGET_BYTES = 1 << 31
"""A remote target (label mask) is read whole: refuse an object larger than this first."""


def is_url(value: Any) -> bool:
    """Whether ``value`` is a URL string (``scheme://...``), not a local path."""
    return isinstance(value, str) and bool(_URL.match(value))


def is_remote(value: Any) -> bool:
    return isinstance(value, RemotePath)


def as_input(value: Any) -> Any:
    """A local ``Path``, or a ``RemotePath`` for a URL (``file://`` is a local path)."""
    if value is None or isinstance(value, RemotePath):
        return value
    text = str(value) if isinstance(value, Path) else value
    if is_url(text):
        if text.lower().startswith("file://"):
            return Path(text[len("file://") :])
        return RemotePath(text)
    return Path(value)


_FILESYSTEMS: dict[str, Any] = {}


def _filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; a usage error without the extra."""
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: reading URLs needs the optional extra: {EXTRA_HINT}") from None
    protocol = url.split("://", 1)[0].lower()
    if protocol not in PROTOCOLS:
        raise UsageError(
            f"{url}: klseg does not read {protocol}:// URLs; it reads "
            + ", ".join(f"{p}://" for p in PROTOCOLS)
        )
    try:
        fs = _FILESYSTEMS.get(protocol)
        if fs is None:
            fs = fsspec.filesystem(protocol, **storage_options(protocol))
            if protocol == "s3":
                fs.retries = 1  # s3fs's own loop would retry botocore's retries (and timeouts)
            _FILESYSTEMS[protocol] = fs
    except ImportError as err:
        raise UsageError(
            f"{url}: the {protocol}:// protocol needs a package that is not installed "
            f"({err}); {EXTRA_HINT}"
        ) from None
    except ValueError as err:
        raise UsageError(f"{url}: {err}") from None
    except Exception as err:  # e.g. ftp:// wants a host argument: not a URL klseg can open
        raise UsageError(
            f"{url}: cannot open a {protocol}:// filesystem ({type(err).__name__}: {err}); "
            "klseg reads s3://, gs://, https://, memory:// and file:// URLs"
        ) from None
    return fs, fs._strip_protocol(url)


def reset_filesystems() -> None:
    """Forget the cached filesystems (tests that change fsspec's configuration, and
    ``network.use`` when the timeouts change: clients are configured when made)."""
    _FILESYSTEMS.clear()


# --- every request: a deadline, retries of transient errors, one line when it fails -------


_timed_out: dict[str, str] = {}
"""Servers (scheme://host:port) that timed out in this run, and how: they are not asked
again, so a dead server costs one timeout, not one per file (``forget_timeouts``)."""


def forget_timeouts() -> None:
    """A new run (``network.use`` of another run's settings) asks every server again."""
    _timed_out.clear()


def _server(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0]}"


def _request(fs, url: str, coro, call, *, nbytes: int | None = None, error=ReadError):
    """One idempotent request: ``coro()`` on an async filesystem's event loop, under the
    request's deadline, else ``call()``. Transient errors are retried with a backoff; a
    timeout, or any other failure, is one ``error`` naming the URL."""
    settings = network.current()
    deadline = settings.deadline(nbytes)
    server = _server(url)
    if server in _timed_out:
        raise error(
            f"not asked: its server timed out earlier in this run ({_timed_out[server]})",
            path=url,
        )
    attempt = 0
    while True:
        try:
            if getattr(fs, "async_impl", False):
                from fsspec.asyn import sync

                return sync(fs.loop, coro, timeout=deadline)
            return call()
        except _TooLongError:
            raise
        except Exception as err:
            if _is_timeout(err):
                message = _timeout_message(err, deadline)
                _timed_out[server] = f"{url}: {message}"
                raise error(message, path=url) from None
            transient = _is_transient(err)
            if transient and attempt < settings.retries:
                time.sleep(settings.backoff * 2**attempt)
                attempt += 1
                continue
            tries = f" ({attempt + 1} tries)" if transient and attempt else ""
            raise error(_describe(err) + tries, path=url) from None


# --- http(s): requests made here, bodies read in blocks up to their bound -----------------


def _http_check(response, url: str) -> None:
    if response.status == 404:
        raise FileNotFoundError(url)
    if response.status in (401, 403):
        raise PermissionError(f"HTTP {response.status}")
    response.raise_for_status()


def _http_kwargs(fs, headers: dict) -> dict:
    kw = dict(fs.kwargs)
    kw["headers"] = {**kw.get("headers", {}), **headers}
    return kw


async def _http_get(fs, url: str, headers: dict, limit: int) -> bytes:
    """The body of a GET, read in blocks; ``_TooLongError`` as soon as it passes ``limit``."""
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **_http_kwargs(fs, headers)) as r:
        _http_check(r, url)
        parts, total = [], 0
        async for block in r.content.iter_chunked(1 << 16):
            total += len(block)
            if total > limit:
                raise _TooLongError(total)
            parts.append(block)
    return b"".join(parts)


def _identity(headers) -> bool:
    return headers.get("Content-Encoding", "identity") in ("identity", "")


async def _http_size(fs, url: str) -> int | None:
    """The object's size from a HEAD (or, where HEAD tells nothing, a one-byte range)."""
    session = await fs.set_session()
    kw = _http_kwargs(fs, {"Accept-Encoding": "identity"})
    async with session.head(fs.encode_url(url), allow_redirects=True, **kw) as r:
        if r.status not in (405, 501):
            _http_check(r, url)
            if "Content-Length" in r.headers and _identity(r.headers):
                return int(r.headers["Content-Length"])
    kw = _http_kwargs(fs, {"Accept-Encoding": "identity", "Range": "bytes=0-0"})
    async with session.get(fs.encode_url(url), **kw) as r:
        _http_check(r, url)
        total = r.headers.get("Content-Range", "").rsplit("/", 1)[-1]
        if total.isdigit():
            return int(total)
        if r.status == 200 and "Content-Length" in r.headers and _identity(r.headers):
            return int(r.headers["Content-Length"])
    return None


_HREF = re.compile(r"""<a\s[^>]*?href\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def index_links(page: str, base: str) -> list[tuple[str, bool]]:
    """(name, is_folder) of the links of an index page that name direct children of
    ``base`` (a folder URL ending in "/"), in page order, each once."""
    seen: dict[str, bool] = {}
    for href in _HREF.findall(page):
        url = urldefrag(urljoin(base, href.strip()))[0].split("?", 1)[0]
        if not url.startswith(base):
            continue
        rest = url[len(base) :]
        name = rest.rstrip("/")
        if name and "/" not in name and name not in (".", ".."):
            seen.setdefault(name, rest.endswith("/"))
    return list(seen.items())


def _is_http(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("http", "https")


class RemotePath:
    """A file or folder named by URL, with the few ``Path`` features pairing needs."""

    is_remote = True

    def __init__(self, url: str, *, kind: str | None = None, size: int | None = None) -> None:
        folder = url.endswith("/") and not url.endswith("://")
        self.url = url.rstrip("/") if folder else url
        self._kind = kind or ("folder" if folder else None)  # a listing or a slash told
        self.size = size

    # --- names -------------------------------------------------------------------------
    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.url.split("://", 1)[1])

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def stem(self) -> str:
        return self._pure.stem

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < str(other)

    def __getstate__(self) -> dict:
        return {"url": self.url, "_kind": self._kind, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # --- the file system -----------------------------------------------------------------
    @property
    def fs(self):
        return _filesystem(self.url)[0]

    @property
    def fs_path(self) -> str:
        return _filesystem(self.url)[1]

    def _info(self, error=InputError) -> dict:
        fs, path = _filesystem(self.url)
        if _is_http(self.url):  # an http object is a file (a folder is asked with a slash)
            size = _request(fs, self.url, lambda: _http_size(fs, self.url), None, error=error)
            return {"type": "file", "size": size}
        return _request(fs, self.url, lambda: fs._info(path), lambda: fs.info(path), error=error)

    def kind(self) -> str:
        """``"file"`` or ``"folder"``; an InputError when the URL names nothing readable."""
        if self._kind is None:
            info = self._info()
            self._kind = "folder" if info.get("type") == "directory" else "file"
            self.size = info.get("size")
        return self._kind

    def is_file(self) -> bool:
        return self.kind() == "file"

    def is_dir(self) -> bool:
        return self.kind() == "folder"

    def iterdir(self):
        """The folder's entries (one listing; their kinds and sizes come with it)."""
        if _is_http(self.url):
            yield from self._index_page()
            return
        fs, path = _filesystem(self.url)
        entries = _request(
            fs, self.url, lambda: fs._ls(path, detail=True), lambda: fs.ls(path, detail=True),
            error=InputError,
        )  # fmt: skip
        base = self.url
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if not name or f"{path.rstrip('/')}/{name}" == path.rstrip("/"):
                continue
            kind = "folder" if entry.get("type") == "directory" else "file"
            yield RemotePath(f"{base}/{name}", kind=kind, size=entry.get("size"))

    def _index_page(self):
        """An http folder's entries: the links of its index page, read up to the bounds of
        ``network.current()`` (an endless or huge page is an error, not a flood)."""
        settings = network.current()
        fs, _ = _filesystem(self.url)
        base = self.url + "/"  # the page's links resolve against the slash
        limit = settings.index_bytes
        try:
            page = _request(
                fs, self.url, lambda: _http_get(fs, base, {}, limit), None, nbytes=limit,
                error=InputError,
            )  # fmt: skip
        except _TooLongError:
            raise InputError(
                f"the index page is larger than {limit:,} bytes; if the folder really lists "
                f"that much, raise {network.ENV['index_bytes']}",
                path=self.url,
            ) from None
        links = index_links(page.decode("utf-8", errors="replace"), base)
        if len(links) > settings.index_links:
            raise InputError(
                f"the index page lists {len(links):,} entries, more than "
                f"{settings.index_links:,}; if that is right, raise "
                f"{network.ENV['index_links']}",
                path=self.url,
            )
        for name, folder in links:
            yield RemotePath(f"{self.url}/{name}", kind="folder" if folder else "file")

    def object_size(self) -> int:
        if self.size is None:  # a listing without sizes (an HTTP index page): ask
            self.size = self._info(ReadError).get("size")
        if self.size is None:
            raise ReadError("the store does not tell the object's size", path=self.url)
        return int(self.size)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the object: one range request, of at most that many."""
        if stop <= start:
            return b""
        fs, path = _filesystem(self.url)
        if _is_http(self.url):
            headers = {"Range": f"bytes={start}-{stop - 1}"}
            coro = lambda: _http_get(fs, self.url, headers, stop - start)  # noqa: E731
        else:
            coro = lambda: fs._cat_file(path, start=start, end=stop)  # noqa: E731
        try:
            data = _request(
                fs, self.url, coro, lambda: fs.cat_file(path, start=start, end=stop),
                nbytes=stop - start,
            )  # fmt: skip
        except _TooLongError:
            raise ReadError(
                f"the server sent more than {stop - start:,} bytes for the range "
                f"{start:,}..{stop:,}: it does not serve byte ranges, which klseg needs to "
                "read a map chunk by chunk",
                path=self.url,
            ) from None
        if len(data) > stop - start:
            raise ReadError(
                f"the server sent {len(data):,} bytes for the range {start:,}..{stop:,}: it "
                "does not serve byte ranges, which klseg needs to read a map chunk by chunk",
                path=self.url,
            )
        if len(data) < stop - start:
            raise ReadError(
                f"object ended early: asked for bytes {start:,}..{stop:,}, got {len(data):,} "
                "(was it truncated or replaced while being read?)",
                path=self.url,
            )
        return data

    def read_all(self, limit: int = MAX_TARGET_BYTES) -> bytes:
        size = self.object_size()
        if size > limit:
            raise ReadError(f"object of {size:,} bytes is too large to read whole", path=self.url)
        return self.read_range(0, size) if size else b""

    def load_array(self, *, npz_key: str | None, max_pixels: int):
        """This object's array (``load_array`` below): ``readers.load_array`` of a URL."""
        return load_array(self, npz_key=npz_key, max_pixels=max_pixels)

    def read_target(self, *, max_pixels: int) -> np.ndarray:
        """This object's label mask (``read_target`` below): ``readers.read_target`` of a URL."""
        return read_target(self, max_pixels=max_pixels)


class RemoteNpy:
    """A remote C-order ``.npy`` read by byte ranges: ``elements(e0, e1)`` is one request.

    Duck-types the ``elements`` source of ``readers.PredictionMap._read_rows`` (as
    ``TiffSegments`` does); nothing of the map is held between calls.
    """

    def __init__(self, rpath: RemotePath, shape, dtype, offset: int) -> None:
        self.path, self.shape, self.dtype, self.offset = (
            rpath,
            tuple(shape),
            np.dtype(dtype),
            offset,
        )
        self.ndim = len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def elements(self, e0: int, e1: int) -> np.ndarray:
        size = self.dtype.itemsize
        out = np.empty(max(e1 - e0, 0), dtype=self.dtype)
        if e1 > e0:
            data = self.path.read_range(self.offset + e0 * size, self.offset + e1 * size)
            memoryview(out).cast("B")[:] = data
        return out

    def asarray(self) -> np.ndarray:
        """The whole array (soft-target sniffing and small maps only)."""
        return self.elements(0, math.prod(self.shape)).reshape(self.shape)

    def __array__(self, dtype=None, copy=None):
        arr = self.asarray()
        return arr if dtype is None else arr.astype(dtype)

    def __getitem__(self, key):
        return self.asarray()[key]


def _npy_header(rpath: RemotePath) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from the first bytes of a remote .npy."""
    size = rpath.object_size()
    head = rpath.read_range(0, min(size, 1024))  # headers are 128 bytes, rarely more
    if len(head) >= 12 and head[:6] == b"\x93NUMPY":
        short = head[6] == 1
        length = int.from_bytes(head[8:10] if short else head[8:12], "little")
        end = min(size, (10 if short else 12) + length)
        if end > len(head):
            head = rpath.read_range(0, end)
    from .safeio import parse_npy_header

    return parse_npy_header(io.BytesIO(head), rpath.url)


def load_array(rpath: RemotePath, *, npz_key: str | None, max_pixels: int):
    """A remote array as stored: ``.npy`` by ranges, ``.zarr`` by chunks, others whole."""
    from .safeio import _check_size

    suffix = rpath.suffix.lower()
    if suffix == ".zarr":
        from .zarrio import open_zarr

        return open_zarr(rpath, max_pixels=max_pixels, key=npz_key)
    if suffix == ".npy":
        shape, dtype, fortran, offset = _npy_header(rpath)
        if dtype.hasobject:
            raise ReadError(
                "holds Python objects; klseg never unpickles files, save a numeric array",
                path=rpath.url,
            )
        _check_size(shape, rpath.url, max_pixels)
        expected = offset + math.prod(shape) * dtype.itemsize
        actual = rpath.object_size()
        if actual < expected:
            raise ReadError(
                f"is truncated: its header promises shape {shape} ({expected:,} bytes) but the "
                f"object has {actual:,} bytes",
                path=rpath.url,
            )
        if fortran and len(shape) > 1:
            raise ReadError(
                "is a Fortran-order .npy; over a URL klseg reads C order only (save with "
                "np.ascontiguousarray)",
                path=rpath.url,
            )
        return RemoteNpy(rpath, shape, dtype, offset)
    if suffix in (".npz", ".tif", ".tiff"):
        return _via_local_copy(rpath, lambda p: _local_load(p, suffix, npz_key, max_pixels))
    raise ReadError(f"unsupported file type {suffix!r}", path=rpath.url)


def _local_load(path: Path, suffix: str, npz_key, max_pixels):
    from .readers import load_array as local_load_array

    arr = local_load_array(path, npz_key=npz_key, max_pixels=max_pixels)
    if not isinstance(arr, np.ndarray):  # TIFF bands: decode them all now
        return arr.asarray()
    return np.array(arr)  # in memory: the temporary copy goes


def _via_local_copy(rpath: RemotePath, read):
    """Read a small object whole into a temporary file and call ``read`` on it; errors name
    the URL, not the temporary file."""
    import tempfile

    data = rpath.read_all()
    with tempfile.TemporaryDirectory(prefix="klseg-remote-") as tmp:
        local = Path(tmp) / rpath.name
        local.write_bytes(data)
        try:
            return read(local)
        except InputError as err:
            raise type(err)(err.message, path=rpath.url) from None


def read_target(rpath: RemotePath, *, max_pixels: int) -> np.ndarray:
    """A remote label mask, read whole (PNG, .npy, .npz, TIFF) with the local checks."""
    if rpath.suffix.lower() == ".zarr":
        from .zarrio import read_zarr_target

        return read_zarr_target(rpath, max_pixels=max_pixels)
    from .readers import read_target as local_read_target

    return _via_local_copy(rpath, lambda p: local_read_target(p, max_pixels=max_pixels))


def _settings_changed() -> None:
    reset_filesystems()  # clients are configured when made: make new ones
    forget_timeouts()  # a new run gives every server a new chance


network.on_change(_settings_changed)
