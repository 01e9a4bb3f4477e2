"""Label masks from ``.npy`` and TIFF files, read whole without memory maps.

Labels are small integer images that klseg reads whole anyway (DESIGN §3), so there is
nothing to gain from a memory map and one thing to lose: a mapped file that another process
truncates during the read kills klseg with SIGBUS. ``.npy`` labels are read with ``pread``
(``safeio.read_npy``); TIFF labels are decoded by tifffile from file reads, whatever their
compression or tiling (zlib, LZW, tiles and strips all decode the same way).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import ReadError
from .safeio import check_regular, read_npy


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

    check_regular(path)
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            series = one_series(tif, path)
            _check_pixels(tuple(series.shape), max_pixels, path)
            return np.asarray(series.asarray(maxworkers=1))
    except ReadError:
        raise
    except OSError as err:
        raise ReadError(f"cannot read: {_describe_oserror(err)}", path=path) from None
    except Exception as err:  # TiffFileError, ValueError, zlib.error, struct.error, ...
        raise ReadError(f"not a valid TIFF file ({type(err).__name__}: {err})", path=path) from None


def read_label_npy(path: Path, *, max_pixels: int) -> np.ndarray:
    """A ``.npy`` label mask read whole with ``pread`` (size checked against the header)."""

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
