"""Zarr arrays (format 3, and 2) as prediction maps and targets, local or by URL.

A ``pred.zarr`` store holds one (H, W, C), (C, H, W) or (H, W) array, or a group whose
array is chosen with ``--zarr-path`` (as ``--npz-key`` chooses inside an ``.npz``). Maps are
read through ``ZarrSource.elements`` — the same duck-typed source ``TiffSegments`` and
``remote.RemoteNpy`` give ``readers.PredictionMap`` — in bands of whole Zarr chunk rows, so
each stored chunk is decoded once as the core's chunks walk the image top to bottom, and
memory stays bounded by a band (``BAND_VALUES``), never the map. ``rows(r0, r1)`` gives a
block of image rows, which is what a Dask task of a split map reads (engine_dask.py).

Zarr allows sparse arrays: a chunk that is not stored reads as the array's fill value. So a
lost chunk of a label mask would silently evaluate as class 0; every store is therefore
opened through a ``CountingStore`` that records the chunks found missing while reading
(into the ``collect_missing`` collector it was opened under: a task's own, so that threads
and runs do not mix; the engine reports them per file in summary.json and as a warning), and
under ``use_strict(True)`` (``--strict-zarr``) a missing chunk is a ReadError. The same store
bounds every request by the timeouts of ``network.py`` (a remote store over fsspec gets the
client options of ``network.storage_options``) and retries transient errors.

zarr runs its reads on its own event loop thread; when a read fails, its sibling chunk reads
are still pending there, and zarr's exit hook would destroy them mid-flight (asyncio's "Task
was destroyed but it is pending!" lines after the error). ``_drain_loop``, registered to run
before that hook, lets them finish first: the error stays one line.

zarr is the optional extra ``klseg[zarr]``.
"""

from __future__ import annotations

import asyncio
import atexit
import math
import threading
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..core.results import missing_message
from ..errors import InputError, ReadError, UsageError
from . import network

BAND_VALUES = 1 << 25
"""Values one band of chunk rows may hold (128 MB of float32); wider bands read exactly."""


_METADATA = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})
_strict = False
_lock = threading.Lock()
_bags = threading.local()  # the collector of the thread that opens a store (collect_missing)
_drain_registered = False


def use_strict(strict: bool) -> None:
    """``--strict-zarr``: whether a missing chunk is an error (else it is counted)."""
    global _strict
    _strict = bool(strict)


@contextmanager
def collect_missing():
    """Collect the chunks found missing in the stores opened in this thread meanwhile:
    yields {store (as named): (set of chunk keys, fill value)}, filled as they are read
    (zarr reads on its own thread: each store holds the collector it was opened under)."""
    bag: dict[str, tuple[set[str], Any]] = {}
    previous = getattr(_bags, "bag", None)
    _bags.bag = bag
    try:
        yield bag
    finally:
        _bags.bag = previous


def frozen(bag: dict) -> dict[str, tuple[frozenset[str], Any]]:
    """A collector's stores that had chunks missing, as plain values (to pickle, merge)."""
    with _lock:
        return {store: (frozenset(keys), fill) for store, (keys, fill) in bag.items() if keys}


def warn_missing(bag: dict) -> None:
    """A warning per store of a collector (``collect_missing``) that had chunks missing."""
    import warnings

    from ..errors import KlsegWarning

    for store, (keys, fill) in sorted(frozen(bag).items()):
        warnings.warn(missing_message(store, len(keys), fill), KlsegWarning, stacklevel=2)


def _drain_loop(wait: float = 5.0) -> None:
    """Let the reads still pending on zarr's event loop finish (or cancel them after
    ``wait`` seconds), so that zarr's own exit hook finds no task to destroy."""
    try:
        from zarr.core import sync as zsync
    except ImportError:  # pragma: no cover
        return
    loop = zsync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(drain(), loop).result(wait + 2)
    except Exception:  # the loop is going anyway; never fail at exit
        pass


def _zarr():
    global _drain_registered
    try:
        import zarr
    except ImportError:
        raise UsageError(
            "reading .zarr stores needs the optional extra: pip install 'klseg[zarr]'"
        ) from None
    if not _drain_registered:
        import zarr.core.sync  # its exit hook first: ours then runs before it

        atexit.register(_drain_loop)
        _drain_registered = True
    return zarr


def _counting_store(store, where: str, bag: dict | None):
    """``store`` wrapped: missing chunks counted into ``bag`` (or refused), requests
    bounded in time."""
    from zarr.storage import WrapperStore

    from .network import _describe, _is_transient, _timeout_message

    class CountingStore(WrapperStore):
        chunk_bytes: int | None = None  # set once the array is open: the deadline's size

        def _with_store(self, store):
            return _counting_store(store, where, bag)

        async def get(self, key, prototype, byte_range=None):
            settings = network.current()
            deadline = settings.deadline(self.chunk_bytes)
            attempt = 0
            while True:
                try:
                    value = await asyncio.wait_for(
                        self._store.get(key, prototype, byte_range), deadline
                    )
                    break
                except InputError:
                    raise
                except asyncio.TimeoutError as err:
                    raise ReadError(_timeout_message(err, deadline), path=where) from None
                except Exception as err:
                    if _is_transient(err) and attempt < settings.retries:
                        await asyncio.sleep(settings.backoff * 2**attempt)
                        attempt += 1
                        continue
                    if _is_transient(err):
                        raise ReadError(f"chunk {key}: {_describe(err)}", path=where) from None
                    raise
            if value is None and key.rsplit("/", 1)[-1] not in _METADATA:
                if _strict:
                    raise ReadError(
                        f"chunk {key} is missing (--strict-zarr: a sparse or damaged store "
                        "is an error; without it, missing chunks read as the fill value)",
                        path=where,
                    )
                if bag is not None:
                    with _lock:
                        bag.setdefault(where, (set(), None))[0].add(key)
            return value

    return CountingStore(store)


def _open(path, key: str | None):
    """The zarr Array of a store (an array, or a group's array named by ``key``)."""
    zarr = _zarr()
    where = str(path)
    try:
        if getattr(path, "is_remote", False):
            from zarr.storage import FsspecStore

            from .network import storage_options

            options = storage_options(path.url.split("://", 1)[0].lower())
            inner: Any = FsspecStore.from_url(path.url, storage_options=options, read_only=True)
        else:
            from zarr.storage import LocalStore

            inner = LocalStore(str(path), read_only=True)
        bag = getattr(_bags, "bag", None)
        store = _counting_store(inner, where, bag)
        node = zarr.open(store=store, mode="r")
        if isinstance(node, zarr.Group):
            keys = sorted(node.array_keys())
            if key is None:
                if len(keys) != 1:
                    raise ReadError(
                        f"is a Zarr group of {len(keys)} arrays ({', '.join(keys) or 'none'});"
                        " choose one with --zarr-path",
                        path=where,
                    )
                key = keys[0]
            try:
                node = node[key]
            except KeyError:
                raise ReadError(
                    f"has no array {key!r} (it has {', '.join(keys) or 'none'})", path=where
                ) from None
            if not isinstance(node, zarr.Array):
                raise ReadError(f"{key!r} is a group, not an array", path=where)
        store.chunk_bytes = math.prod(node.chunks) * np.dtype(node.dtype).itemsize
        if bag is not None:
            with _lock:
                bag[where] = (bag.get(where, (set(), None))[0], _plain(node.fill_value))
        return node
    except InputError:
        raise
    except FileNotFoundError:
        raise ReadError("no Zarr store here (no zarr.json or .zarray)", path=where) from None
    except PermissionError as err:
        raise ReadError(f"access denied ({err})", path=where) from None
    except Exception as err:
        raise ReadError(
            f"not a readable Zarr store ({type(err).__name__}: {err})", path=where
        ) from None


def _plain(value):
    """A fill value as JSON writes it (a NumPy scalar as a Python number)."""
    return value.item() if hasattr(value, "item") else value


def _guard(path):
    """Errors while decoding chunks are ReadErrors naming the store."""

    class Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, err, tb):
            if err is None or isinstance(err, InputError):
                return False
            raise ReadError(
                f"cannot read Zarr chunks ({type(err).__name__}: {err})", path=str(path)
            ) from None

    return Guard()


class ZarrSource:
    """A Zarr array read in bands of whole chunk rows (see the module docstring)."""

    def __init__(self, path, array, key: str | None = None) -> None:
        self.path, self.array, self.key = path, array, key
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunk_rows = int(array.chunks[0]) if self.ndim else 1
        self._bands: dict[Any, tuple[int, int, np.ndarray]] = {}

    def __getstate__(self) -> dict:  # a Dask task reopens the store where it runs
        return {"path": self.path, "key": self.key}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], _open(state["path"], state["key"]), state["key"])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __getitem__(self, key):
        with _guard(self.path):
            return np.asarray(self.array[key])

    def __array__(self, dtype=None, copy=None):
        arr = self[...]
        return arr if dtype is None else arr.astype(dtype)

    def asarray(self) -> np.ndarray:
        return self[...]

    def _band(self, key, lo: int, hi: int, axis: int, per: int, read) -> tuple[int, np.ndarray]:
        """Indices [lo, hi) along ``axis`` from a cached band aligned to the Zarr chunks
        along it, so that a chunk is decoded once as the core walks the map (``per``: values
        per index; a band over BAND_VALUES with the others is read exactly, not kept)."""
        cached = self._bands.get(key)
        if cached is not None and cached[0] <= lo and hi <= cached[1]:
            return cached[0], cached[2]
        self._bands.pop(key, None)
        step, n = int(self.array.chunks[axis]), self.shape[axis]
        r0, r1 = lo // step * step, min(-(-hi // step) * step, n)
        keep = (r1 - r0) * per * (len(self._bands) + 1) <= BAND_VALUES
        if not keep:
            r0, r1 = lo, hi
        band = read(r0, r1)
        if keep:
            self._bands[key] = (r0, r1, band)
        return r0, band

    def elements(self, e0: int, e1: int) -> np.ndarray:
        """Flat elements [e0, e1) of the array in C order, as a 1-D array.

        A range inside one index of the first axis (a class plane of a (C, H, W) map) is
        served from a band of rows of the planes (of every plane at once when a chunk holds
        several: each chunk is decoded once, not once per class); any other range from a
        band of first-axis rows (image rows of an (H, W, C) or (H, W) map)."""
        if e1 <= e0:
            return np.empty(0, dtype=self.dtype)
        z = self.array
        with _guard(self.path):
            per0 = math.prod(self.shape[1:])
            a0, a1 = e0 // per0, (e1 - 1) // per0
            if self.ndim == 3 and a0 == a1:
                A, K = self.shape[0], self.shape[2]
                b0, b1 = (e0 - a0 * per0) // K, (e1 - 1 - a0 * per0) // K + 1
                if int(z.chunks[0]) > 1:  # chunks span planes: one band of all of them
                    r0, band = self._band(
                        "planes", b0, b1, 1, A * K, lambda lo, hi: np.asarray(z[:, lo:hi])
                    )
                    flat = band[a0].reshape(-1)
                else:
                    r0, band = self._band(a0, b0, b1, 1, K, lambda lo, hi: np.asarray(z[a0, lo:hi]))
                    flat = band.reshape(-1)
                start = e0 - a0 * per0 - r0 * K
            else:
                r0, band = self._band(
                    None, a0, a1 + 1, 0, per0, lambda lo, hi: np.asarray(z[lo:hi])
                )
                flat = band.reshape(-1)
                start = e0 - r0 * per0
            return flat[start : start + (e1 - e0)]

    def rows(self, layout: str, r0: int, r1: int) -> np.ndarray:
        """Image rows [r0, r1) of the map as a NumPy array in its stored layout."""
        with _guard(self.path):
            if layout == "chw":
                return np.asarray(self.array[:, r0:r1, :])
            return np.asarray(self.array[r0:r1])


def open_zarr(path, *, max_pixels: int, key: str | None = None) -> ZarrSource:
    """A prediction (or soft target) map stored as Zarr; the header alone is checked here."""
    from .safeio import _check_size

    array = _open(path, key)
    _check_size(tuple(array.shape), str(path), max_pixels)
    return ZarrSource(path, array, key)


def read_zarr_target(path, *, max_pixels: int, key: str | None = None) -> np.ndarray:
    """A label mask stored as Zarr, read whole (2-D integers, as any target)."""
    from .safeio import _check_size

    array = _open(path, key)
    _check_size(tuple(array.shape), str(path), max_pixels)
    if array.ndim != 2:
        raise ReadError(
            f"a label mask must be 2-D (H, W), got shape {tuple(array.shape)}", path=str(path)
        )
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "iub":
        raise ReadError(f"holds {dtype} values; labels must be integers", path=str(path))
    with _guard(path):
        arr = np.asarray(array[...])
    return arr.astype(np.uint8) if arr.dtype.kind == "b" else arr


def label_rows(path, r0: int, r1: int, *, key: str | None = None) -> np.ndarray:
    """Rows [r0, r1) of a Zarr label mask (a task of a split map reads only its rows)."""
    array = _open(path, key)
    if np.dtype(array.dtype).kind not in "iub":
        raise ReadError(f"holds {array.dtype} values; labels must be integers", path=str(path))
    with _guard(path):
        arr = np.asarray(array[r0:r1])
    return arr.astype(np.uint8) if arr.dtype.kind == "b" else arr
