"""Zarr arrays (format 3, and 2) as prediction maps and targets, local or by URL.

A ``pred.zarr`` store holds one (H, W, C), (C, H, W) or (H, W) array, or a group whose
array is chosen with ``--zarr-path`` (as ``--npz-key`` chooses inside an ``.npz``). Maps are
read through ``ZarrSource.elements`` — the same duck-typed source ``TiffSegments`` and
``remote.RemoteNpy`` give ``readers.PredictionMap`` — in bands of whole Zarr chunk rows, so
each stored chunk is decoded once as the core's chunks walk the image top to bottom, and
memory stays bounded by a band (``BAND_VALUES``), never the map. ``rows(r0, r1)`` gives a
block of image rows, which is what a Dask task of a split map reads (engine_dask.py).

zarr is the optional extra ``klseg[zarr]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InputError, ReadError, UsageError

BAND_VALUES = 1 << 25
"""Values one band of chunk rows may hold (128 MB of float32); wider bands read exactly."""


def _zarr():
    try:
        import zarr
    except ImportError:
        raise UsageError(
            "reading .zarr stores needs the optional extra: pip install 'klseg[zarr]'"
        ) from None
    return zarr


def _open(path, key: str | None):
    """The zarr Array of a store (an array, or a group's array named by ``key``)."""
    zarr = _zarr()
    where = str(path)
    try:
        if getattr(path, "is_remote", False):
            from zarr.storage import FsspecStore

            store: Any = FsspecStore.from_url(path.url, read_only=True)
        else:
            store = str(path)
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
