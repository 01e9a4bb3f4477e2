"""Fortran-order ``.npy`` maps read in bounded memory and linear time.

A Fortran-order (H, W, C) array is stored as the C-order array (C, W, H): a run of image
rows is not contiguous in the file, and reading a chunk of pixels through the memory map
made NumPy copy the whole map for every chunk (quadratic: 2048²×4 took 14.6 s and 371 MB).
Here a band of rows is gathered with one ``pread`` per contiguous run into a buffer of at
most ``BAND_VALUES`` values, and chunks, which walk the image top to bottom, are served
from it. ``pread`` also makes a file truncated during the read an error ("file ended
early") instead of a SIGBUS from a mapped page past the new end of the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .safeio import pread_exact

BAND_VALUES = 1 << 22
"""Values held in one band (16 MB of float32), like the largest chunk."""


class FortranRows:
    """Rows [r0, r1) of a Fortran-order array in a file, in its logical axis order."""

    def __init__(self, path: Path, filename: str, offset: int, shape, dtype, row_axis: int):
        self.path, self.filename, self.offset = Path(path), filename, offset
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_axis = row_axis
        self.stored = self.shape[::-1]  # the C-order array the file really holds
        self.axis = len(self.shape) - 1 - row_axis  # the row axis among the stored axes
        per_row = math.prod(self.shape) // max(self.shape[row_axis], 1)
        self.band_rows = max(1, BAND_VALUES // max(per_row, 1))
        self._band: tuple[int, np.ndarray] | None = None

    def _read_band(self, k: int) -> np.ndarray:
        h = self.shape[self.row_axis]
        r0 = k * self.band_rows
        r1 = min(h, r0 + self.band_rows)
        outer = self.stored[: self.axis]
        inner = math.prod(self.stored[self.axis + 1 :])
        buf = np.empty((*outer, r1 - r0, *self.stored[self.axis + 1 :]), dtype=self.dtype)
        runs = buf.reshape(math.prod(outer), -1)  # one contiguous run of the file per row
        step = h * inner * self.dtype.itemsize
        start = self.offset + r0 * inner * self.dtype.itemsize
        fd = os.open(self.filename, os.O_RDONLY)
        try:
            for i in range(runs.shape[0]):
                pread_exact(fd, start + i * step, runs[i], self.path)
        finally:
            os.close(fd)
        return buf.transpose(tuple(range(buf.ndim))[::-1])  # the logical axis order

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) along the row axis, in the logical layout (a copy or a view)."""
        parts, r = [], r0
        while r < r1:
            k = r // self.band_rows
            if self._band is None or self._band[0] != k:
                self._band = None  # let the old band go before the next one is read
                self._band = (k, self._read_band(k))
            band = self._band[1]
            b0 = k * self.band_rows
            stop = min(r1, b0 + band.shape[self.row_axis])
            index = [slice(None)] * band.ndim
            index[self.row_axis] = slice(r - b0, stop - b0)
            parts.append(band[tuple(index)])
            r = stop
        return np.concatenate(parts, axis=self.row_axis) if len(parts) > 1 else parts[0]


def fortran_rows(pm) -> FortranRows | None:
    """A band reader for a PredictionMap over a Fortran-order memory-mapped file, else None."""
    cached = pm.__dict__.get("_fortran_rows", False)
    if cached is not False:
        return cached
    a = pm.array
    reader = None
    if (
        isinstance(a, np.memmap)
        and a.filename is not None
        and a.flags.f_contiguous
        and not a.flags.c_contiguous
    ):
        row_axis = 1 if pm.layout == "chw" else 0
        reader = FortranRows(pm.path, a.filename, a.offset, a.shape, a.dtype, row_axis)
    pm.__dict__["_fortran_rows"] = reader
    return reader
