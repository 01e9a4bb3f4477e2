"""Label masks from ``.npy``, TIFF and Zarr files, without memory maps.

A mapped file that another process truncates during the read kills klseg with SIGBUS, so
labels are never memory-mapped. Masks up to ``WHOLE_LABEL_BYTES`` are read whole: ``.npy``
with ``pread`` (``safeio.read_npy``), TIFF decoded by tifffile from file reads, whatever
its compression or tiling. Larger ones (a whole-slide mask of 100k × 100k is 10 GB) are a
``LabelBands``: read in ranges of rows as the chunks walk the image, so memory does not grow
with the image — ``.npy`` by ``pread``, TIFF strip by strip or row of tiles by row of tiles,
Zarr chunk row by chunk row. PNG masks are always decoded whole (zlib streams cannot be
entered in the middle).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import ReadError
from .safeio import check_regular, npy_header, open_regular, pread_exact, read_npy

WHOLE_LABEL_BYTES = 32 << 20
"""Label masks up to this size (32 MiB: a 5657² uint8 mask) are read whole; larger ones in
row bands (``LabelBands``)."""
BAND_ELEMENTS = 1 << 20
"""Labels read at a time from a banded mask (1 MiB of uint8)."""


class LabelBands:
    """A 2-D label mask read in ranges of rows, never whole: ``shape``, ``dtype`` and the
    slicing the evaluation loop uses — ``reshape(-1)[a:b]`` (flat pixel ranges, as chunks
    and ``LabelSpec.check`` read them) and ``labels[r0:r1]`` (row bands, as the heatmap
    panels and the calibration views read them). ``np.asarray`` reads it whole (what the
    boundary metrics need). Boolean masks read as uint8.

    ``source`` has ``shape``, ``dtype`` and ``elements(e0, e1)``: flat C-order values.
    """

    ndim = 2

    def __init__(self, path, source) -> None:
        self.path, self.source = path, source
        self.shape = tuple(int(n) for n in source.shape)
        stored = np.dtype(source.dtype)
        self.dtype = np.dtype(np.uint8) if stored.kind == "b" else stored
        self.size = math.prod(self.shape)
        self._band: tuple[int, int, np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def elements(self, e0: int, e1: int) -> np.ndarray:
        """Flat labels [e0, e1), served from a band of ``BAND_ELEMENTS`` read at a time."""
        e0, e1 = max(0, e0), min(self.size, e1)
        if e1 <= e0:
            return np.empty(0, dtype=self.dtype)
        band = self._band
        if band is None or e0 < band[0] or e1 > band[1]:
            b1 = min(self.size, max(e1, e0 + BAND_ELEMENTS))
            values = np.asarray(self.source.elements(e0, b1)).reshape(-1)
            band = self._band = (e0, b1, values.astype(self.dtype, copy=False))
        return band[2][e0 - band[0] : e1 - band[0]]

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if tuple(shape) in ((-1,), (self.size,)):
            return _FlatLabels(self)
        if tuple(shape) == self.shape:
            return self
        raise ValueError(f"a banded label mask reshapes to (-1,) only, not {shape}")

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2 and key[1] == slice(None):
            key = key[0]
        if isinstance(key, slice) and key.step in (None, 1):
            r0, r1, _ = key.indices(self.shape[0])
            W = self.shape[1]
            return self.elements(r0 * W, max(r0, r1) * W).reshape(max(r1 - r0, 0), W)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        whole = np.asarray(self.source.elements(0, self.size)).reshape(self.shape)
        return whole.astype(dtype or self.dtype, copy=False)


class _FlatLabels:
    """``LabelBands.reshape(-1)``: flat pixel ranges ``[a:b]``."""

    ndim = 1

    def __init__(self, labels: LabelBands) -> None:
        self.labels, self.dtype, self.size = labels, labels.dtype, labels.size
        self.shape = (labels.size,)

    def __len__(self) -> int:
        return self.size

    def reshape(self, *shape):
        return self.labels.reshape(*shape)

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.size)
            return self.labels.elements(start, stop)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.labels, dtype=dtype).reshape(-1)


class _PreadSource:
    """Flat values of a C-order array stored raw at ``offset`` in a file, read by ``pread``
    (a file truncated meanwhile is "file ended early", never a SIGBUS)."""

    def __init__(self, path, shape, dtype, offset: int) -> None:
        self.path, self.shape, self.dtype, self.offset = path, shape, np.dtype(dtype), offset

    def elements(self, e0: int, e1: int) -> np.ndarray:
        out = np.empty(e1 - e0, dtype=self.dtype)
        fd = open_regular(self.path)
        try:
            pread_exact(fd, self.offset + e0 * self.dtype.itemsize, out, self.path)
        finally:
            os.close(fd)
        return out


def banded(shape: tuple[int, ...], dtype) -> bool:
    """Whether a label mask of this header is read in row bands (large, 2-D, integer)."""
    dtype = np.dtype(dtype)
    return (
        len(shape) == 2
        and dtype.kind in "iub"
        and math.prod(shape) * dtype.itemsize > WHOLE_LABEL_BYTES
    )


def one_series(tif, path: Path | str):
    """The only image series of an open TIFF; several are an error that lists them.

    A TIFF may hold several images (a thumbnail, a second channel saved separately): using
    the first one silently would evaluate whatever happened to be saved first.
    """
    series = tif.series
    if not series:
        raise ReadError("TIFF holds no image", path=path)
    if len(series) > 1:
        shapes = ", ".join(f"#{i} {tuple(s.shape)} {s.dtype}" for i, s in enumerate(series[:5]))
        more = f" and {len(series) - 5} more" if len(series) > 5 else ""
        raise ReadError(
            f"TIFF holds {len(series)} images ({shapes}{more}); klseg reads a TIFF with one "
            "image: save the map or mask on its own",
            path=path,
        )
    return series[0]


def read_label_tiff(path: Path, *, max_pixels: int) -> np.ndarray:
    """A TIFF label mask decoded into memory (any compression, tiles or strips)."""
    import tifffile

    from .safeio import _describe_oserror, _quiet_tifffile
    from .tiffsegments import TiffSegments

    check_regular(path)
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            series = one_series(tif, path)
            _check_pixels(tuple(series.shape), max_pixels, path)
            if banded(tuple(series.shape), series.dtype):
                source = _tiff_source(path, tif, series) or TiffSegments.open(path, series)
                if source is not None:
                    return LabelBands(path, source)
            return np.asarray(series.asarray(maxworkers=1))
    except ReadError:
        raise
    except OSError as err:
        raise ReadError(f"cannot read: {_describe_oserror(err)}", path=path) from None
    except Exception as err:  # TiffFileError, ValueError, zlib.error, struct.error, ...
        raise ReadError(f"not a valid TIFF file ({type(err).__name__}: {err})", path=path) from None


def _tiff_source(path: Path, tif, series) -> _PreadSource | None:
    """An uncompressed TIFF whose data lies in one run (``series.dataoffset``): read by
    ``pread`` at its offset, in the file's byte order."""
    offset = getattr(series, "dataoffset", None)
    if offset is None or series.keyframe.compression != 1:
        return None
    dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
    return _PreadSource(path, tuple(series.shape), dtype, int(offset))


def read_label_npy(path: Path, *, max_pixels: int) -> np.ndarray | LabelBands:
    """A ``.npy`` label mask read with ``pread`` (size checked against the header): whole,
    or in row bands when it is over ``WHOLE_LABEL_BYTES`` (``LabelBands``)."""
    fd = open_regular(path)
    try:
        shape, dtype, fortran, offset = npy_header(fd, path)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if not fortran and not dtype.hasobject and banded(shape, dtype):
        _check_pixels(shape, max_pixels, path)
        expected = offset + math.prod(shape) * dtype.itemsize
        if size < expected:
            raise ReadError(
                f"is truncated: its header promises shape {shape} ({expected:,} bytes) but "
                f"the file has {size:,} bytes",
                path=path,
            )
        return LabelBands(path, _PreadSource(path, shape, dtype, offset))

    def check(shape: tuple[int, ...]) -> None:
        _check_pixels(shape, max_pixels, path)

    return read_npy(path, check_shape=check)


def _check_pixels(shape: tuple[int, ...], max_pixels: int, path: Path | str) -> None:
    pixels = math.prod(sorted(shape)[-2:]) if shape else 1
    if pixels > max_pixels:
        raise ReadError(
            f"header claims shape {tuple(shape)}, {pixels:,} pixels, more than --max-pixels "
            f"{max_pixels:,}; raise --max-pixels if the file is genuine",
            path=path,
        )
