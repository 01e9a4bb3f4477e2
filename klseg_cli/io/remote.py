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
``AWS_ACCESS_KEY_ID``) — klseg passes none of its own.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import InputError, ReadError, UsageError

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
PROTOCOLS = ("s3", "gs", "gcs", "http", "https", "memory", "file")
"""URL schemes klseg opens through fsspec (others, e.g. ftp://, need arguments a URL lacks)."""


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
            fs = _FILESYSTEMS[protocol] = fsspec.filesystem(protocol)
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
    """Forget the cached filesystems (tests that change fsspec's configuration)."""
    _FILESYSTEMS.clear()


def _describe(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such object"
    if isinstance(err, PermissionError):
        return f"access denied ({err})"
    return f"cannot read ({type(err).__name__}: {err})"


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

    def kind(self) -> str:
        """``"file"`` or ``"folder"``; an InputError when the URL names nothing readable."""
        if self._kind is None:
            fs, path = _filesystem(self.url)
            try:
                info = fs.info(path)
            except Exception as err:  # FileNotFoundError, PermissionError, botocore's...
                raise InputError(_describe(err), path=self.url) from None
            self._kind = "folder" if info.get("type") == "directory" else "file"
            self.size = info.get("size")
        return self._kind

    def is_file(self) -> bool:
        return self.kind() == "file"

    def is_dir(self) -> bool:
        return self.kind() == "folder"

    def iterdir(self):
        """The folder's entries (one listing; their kinds and sizes come with it)."""
        fs, path = _filesystem(self.url)
        if self.url.split("://", 1)[0].lower() in ("http", "https"):
            path = self.url + "/"  # an index page: its links resolve against the slash
        try:
            entries = fs.ls(path, detail=True)
        except Exception as err:
            raise InputError(_describe(err), path=self.url) from None
        base = self.url
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if not name or f"{path.rstrip('/')}/{name}" == path.rstrip("/"):
                continue
            kind = "folder" if entry.get("type") == "directory" else "file"
            yield RemotePath(f"{base}/{name}", kind=kind, size=entry.get("size"))

    def object_size(self) -> int:
        if self.size is None:  # a listing without sizes (an HTTP index page): ask
            fs, path = _filesystem(self.url)
            try:
                self.size = fs.info(path).get("size")
            except Exception as err:
                raise ReadError(_describe(err), path=self.url) from None
        if self.size is None:
            raise ReadError("the store does not tell the object's size", path=self.url)
        return int(self.size)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the object: one range request."""
        fs, path = _filesystem(self.url)
        try:
            data = fs.cat_file(path, start=start, end=stop)
        except Exception as err:
            raise ReadError(_describe(err), path=self.url) from None
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
