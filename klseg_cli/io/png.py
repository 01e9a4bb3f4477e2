"""A streaming PNG writer: RGB rows in, band by band, so no image is ever whole in memory.

Pillow needs the full image to save a PNG; a 20000×20000 heatmap would be 1.2 GB of RGB.
This writer emits IDAT chunks as bands arrive (filter "Sub" per row, zlib level 6) and
renames the finished file into place, so a reader never sees half a PNG.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .atomic import atomic_path

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(fh, kind: bytes, data: bytes) -> None:
    fh.write(struct.pack(">I", len(data)))
    fh.write(kind)
    fh.write(data)
    fh.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF))


def _filter_sub(band: np.ndarray) -> bytes:
    """PNG filter type 1 (Sub) on (rows, width, 3) uint8: each byte minus its left pixel's."""
    rows, width, _ = band.shape
    flat = band.reshape(rows, width * 3)
    out = np.empty((rows, width * 3 + 1), dtype=np.uint8)
    out[:, 0] = 1
    out[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=out[:, 4:])  # wraps modulo 256, as PNG wants
    return out.tobytes()


def write_rgb_png(path: Path, width: int, height: int, bands: Iterable[np.ndarray]) -> None:
    """Write an 8-bit RGB PNG from bands of shape (rows, width, 3) that add up to ``height``."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(_SIGNATURE)
        _chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        comp = zlib.compressobj(6)
        rows = 0
        for band in bands:
            band = np.ascontiguousarray(band, dtype=np.uint8)
            if band.ndim != 3 or band.shape[1:] != (width, 3):
                raise ValueError(f"band of shape {band.shape}, expected (rows, {width}, 3)")
            rows += band.shape[0]
            data = comp.compress(_filter_sub(band))
            if data:
                _chunk(fh, b"IDAT", data)
        if rows != height:
            raise ValueError(f"got {rows} rows, expected {height}")
        _chunk(fh, b"IDAT", comp.flush())
        _chunk(fh, b"IEND", b"")
