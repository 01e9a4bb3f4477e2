"""``TiffSegments``: a compressed, tiled or stripped TIFF series read band by band; the
prediction reader (``readers``) and the label reader (``labelio``) both use it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import ReadError
from .safeio import _describe_oserror, _quiet_tifffile


class TiffSegments:
    """A compressed, tiled or stripped TIFF series read band by band in bounded memory.

    The series' values in C order are its pages one after the other, each page in its
    stored order: (rows, columns, samples), or (samples, rows, columns) for separate sample
    planes. So any range of the series' flat elements maps onto bands (a strip, or a row of
    tiles) of one sample plane of one page, whatever shape tifffile gives the series —
    (1, W, C) stored as a W × C page, (C, H, W) as C pages or C samples, (H, W, C) with
    contiguous samples. ``elements(e0, e1)`` serves flat ranges; the last band decoded of
    each page and plane is kept, as chunks walk the image top to bottom.
    """

    def __init__(self, path: Path, series, pages, key) -> None:
        self.path = path
        self.shape = tuple(series.shape)
        self.dtype = np.dtype(series.dtype)
        self.ndim = len(self.shape)
        self.key = key  # decodes segments (it needs no open file)
        self.segments = [(np.asarray(p.dataoffsets), np.asarray(p.databytecounts)) for p in pages]
        self.rows, self.cols, self.samples = key.imagelength, key.imagewidth, key.samplesperpixel
        self.separate = key.planarconfig == 2 and self.samples > 1
        self.band_height = min(key.tilelength if key.is_tiled else key.rowsperstrip, self.rows)
        self.band_height = max(self.band_height, 1)
        self.per_band = -(-self.cols // key.tilewidth) if key.is_tiled else 1
        self.plane_bands = -(-self.rows // self.band_height)
        self.page_elements = self.rows * self.cols * self.samples
        self._bands: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def asarray(self) -> np.ndarray:
        """The whole series, decoded into memory (label masks, which are read whole)."""
        return self.elements(0, math.prod(self.shape)).reshape(self.shape)

    @classmethod
    def open(cls, path: Path, series):
        pages = list(series.pages)  # TiffPage or TiffFrame: the keyframe holds the tags
        key = series.keyframe
        if not pages or any(p is None for p in pages) or key.imagedepth != 1:
            return None
        if np.dtype(key.dtype) != np.dtype(series.dtype):
            return None
        elements = key.imagelength * key.imagewidth * key.samplesperpixel
        if len(pages) * elements != math.prod(series.shape):
            return None
        return cls(path, series, pages, key)

    def _decode_band(self, page: int, plane: int, k: int) -> np.ndarray:
        """Band k of one sample plane of one page, flat in stored order."""
        try:
            return self._decode_band_unchecked(page, plane, k)
        except OSError as err:
            raise ReadError(f"cannot read: {_describe_oserror(err)}", path=self.path) from None
        except Exception as err:  # zlib.error, ValueError, IndexError on damaged tiles...
            raise ReadError(
                f"damaged TIFF tile data ({type(err).__name__}: {err})", path=self.path
            ) from None

    def _decode_band_unchecked(self, page: int, plane: int, k: int) -> np.ndarray:
        r0 = k * self.band_height
        rows = min(self.band_height, self.rows - r0)
        depth = 1 if self.separate else self.samples
        out = np.zeros((rows, self.cols, depth), dtype=self.dtype)
        offsets, counts = self.segments[page]
        first = plane * self.plane_bands * self.per_band + k * self.per_band
        key = self.key
        with _quiet_tifffile(), open(self.path, "rb") as fh:
            for index in range(first, first + self.per_band):
                fh.seek(int(offsets[index]))
                data = fh.read(int(counts[index]))
                if len(data) < int(counts[index]):
                    raise ReadError("file ended early inside TIFF tile data", path=self.path)
                seg, (_, _, y, x, _), _ = key.decode(data, index, jpegtables=key.jpegtables)
                if seg is None:
                    continue
                seg = seg.reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])
                h = min(seg.shape[0], self.rows - y)
                w = min(seg.shape[1], self.cols - x)
                out[y - r0 : y - r0 + h, x : x + w] = seg[:h, :w]
        return out.reshape(-1)

    def elements(self, e0: int, e1: int) -> np.ndarray:
        """Flat elements [e0, e1) of the series in C order, as a 1-D array."""
        out = np.empty(max(e1 - e0, 0), dtype=self.dtype)
        plane_size = self.rows * self.cols
        row_size = self.cols * (1 if self.separate else self.samples)
        e = e0
        while e < e1:
            page, within = divmod(e, self.page_elements)
            plane, within = divmod(within, plane_size) if self.separate else (0, within)
            k = (within // row_size) // self.band_height
            cached = self._bands.get((page, plane))
            if cached is None or cached[0] != k:
                self._bands.pop((page, plane), None)  # the old band goes before the new
                cached = (k, self._decode_band(page, plane, k))
                self._bands[(page, plane)] = cached
            band = cached[1]
            offset = within - k * self.band_height * row_size
            take = min(e1 - e, band.size - offset)
            out[e - e0 : e - e0 + take] = band[offset : offset + take]
            e += take
        return out
