"""File formats and layouts: the only module that knows NumPy files, TIFF and PNG.

Predictions are opened lazily (``.npy`` and uncompressed TIFF are memory-mapped) and read
block by block as class-major float chunks, so memory is bounded by the chunk size, not by
the image. Label masks are read whole up to ``labelio.WHOLE_LABEL_BYTES`` and in row bands
beyond (``labelio.LabelBands``: ``.npy``, TIFF, Zarr); PNG masks are always decoded whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import LabelError, ReadError, ShapeError, UsageError
from .fortran import fortran_rows
from .labelio import LabelBands, banded, one_series, read_label_npy, read_label_tiff
from .safeio import (
    _check_size,
    _describe_oserror,
    _quiet_tifffile,
    check_regular,
    parse_npy_header,
)
from .tiffsegments import TiffSegments

PRED_SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".nii", ".nii.gz")  # NIfTI: volumes.py
TARGET_SUFFIXES = (".png", ".npy", ".npz", ".tif", ".tiff", ".nii", ".nii.gz")
LAYOUTS = ("hwc", "chw")


def sum_tolerance(dtype: np.dtype) -> float:
    """How far a pixel's probabilities may sum from 1: float16 keeps ~3 significant digits."""
    return 1e-2 if np.dtype(dtype) == np.float16 else 1e-3


def _check_float_dtype(dtype: np.dtype, path: Path) -> None:
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return
    if dtype.kind == "c":
        problem = "holds complex numbers"
    elif dtype.kind in "iub":
        problem = f"holds {dtype} values, not probabilities or logits"
    elif dtype.fields is not None:
        problem = "has a structured dtype"
    else:
        problem = f"has dtype {dtype}"
    raise ReadError(f"{problem}; a prediction must be float16, float32 or float64", path=path)


def _load_npy(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Memory-map a .npy after checking its header: size, dtype, and that no data is missing."""
    try:
        with open(path, "rb") as fh:  # the header only, never the data
            shape, dtype, _, offset = parse_npy_header(fh, path)
    except OSError as err:
        raise ReadError(f"cannot read: {_describe_oserror(err)}", path=path) from None
    if dtype.hasobject:
        raise ReadError(
            "holds Python objects; klseg never unpickles files, save a numeric array", path=path
        )
    _check_size(shape, path, max_pixels)
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise ReadError(
            f"is truncated: its header promises shape {shape} ({expected:,} bytes) but the "
            f"file has {actual:,} bytes",
            path=path,
        )
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as err:
        raise ReadError(f"cannot read: {_describe_oserror(err)}", path=path) from None
    except Exception as err:
        raise ReadError(f"not a valid .npy file ({err})", path=path) from None


def _load_npz(path: Path, key: str | None) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if key is None:
                if len(keys) != 1:
                    raise ReadError(
                        f"holds {len(keys)} arrays ({', '.join(keys) or 'none'}); "
                        "choose one with --npz-key",
                        path=path,
                    )
                key = keys[0]
            elif key not in keys:
                raise ReadError(
                    f"has no array {key!r} (it has {', '.join(keys) or 'none'})", path=path
                )
            return archive[key]
    except ReadError:
        raise
    except OSError as err:
        raise ReadError(f"cannot read: {_describe_oserror(err)}", path=path) from None
    except (ValueError, zipfile.BadZipFile, EOFError) as err:
        if "allow_pickle" in str(err):
            raise ReadError(
                "holds Python objects; klseg never unpickles files, save a numeric array",
                path=path,
            ) from None
        raise ReadError(f"not a valid .npz file ({err})", path=path) from None
    except Exception as err:
        raise ReadError(f"not a valid .npz file ({type(err).__name__}: {err})", path=path) from None


def _load_tiff(path: Path, *, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ReadError("TIFF holds no image", path=path)
            series = one_series(tif, path)  # several images: an error, never the first
            _check_size(tuple(series.shape), path, max_pixels)
            try:
                return tifffile.memmap(path, mode="r")
            except Exception:  # compressed, tiled or in pieces: decode as needed
                pass
            tiles = TiffSegments.open(path, series)
            return tiles if tiles is not None else series.asarray()
    except ReadError:
        raise
    except OSError as err:
        raise ReadError(f"cannot read: {_describe_oserror(err)}", path=path) from None
    except Exception as err:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise ReadError(f"not a valid TIFF file ({type(err).__name__}: {err})", path=path) from None


def load_array(path: Path, *, npz_key: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open an array file as stored: ``.npy`` and plain TIFF memory-mapped, ``.npz`` loaded."""
    if getattr(path, "is_remote", False):  # a URL (remote.RemotePath): by byte ranges
        return path.load_array(npz_key=npz_key, max_pixels=max_pixels)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".zarr":  # a folder of chunks (zarrio.py)
        from .zarrio import open_zarr

        return open_zarr(path, max_pixels=max_pixels, key=npz_key)
    check_regular(path)  # a FIFO or /dev/zero is refused, never opened (it would block)
    if suffix == ".npy":
        arr = _load_npy(path, max_pixels=max_pixels)
    elif suffix == ".npz":
        arr = _load_npz(path, npz_key)
    elif suffix in (".tif", ".tiff"):
        arr = _load_tiff(path, max_pixels=max_pixels)
    else:
        raise ReadError(f"unsupported file type {suffix!r}", path=path)
    return arr


# --- layouts ------------------------------------------------------------------------------


def detect_layout(
    shape: tuple[int, ...],
    hw: tuple[int, int] | None,
    *,
    layout: str | None = None,
    num_classes: int | None = None,
    path: Path | None = None,
) -> str:
    """``"hwc"``, ``"chw"`` or ``"hw"`` (a 2-D map: P(class 1) of a binary task).

    The class axis is the one that is not the target's (H, W); when both ends fit (H = W = C)
    the caller must say ``--layout``. Without a target (``hw=None``) the class axis must be
    given, or be the one matching ``num_classes``, or be clearly the smallest end axis.
    """
    if len(shape) == 2:
        if hw is not None and tuple(shape) != tuple(hw):
            raise ShapeError(f"shape {tuple(shape)} does not match target {tuple(hw)}", path=path)
        return "hw"
    if len(shape) != 3:
        raise ShapeError(
            f"has {len(shape)} dimensions {tuple(shape)}; expected (H, W, C), (C, H, W) or (H, W)",
            path=path,
        )
    if layout is not None:
        layout = layout.lower()
        if layout not in LAYOUTS:
            raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        got_hw = shape[:2] if layout == "hwc" else shape[1:]
        if hw is not None and tuple(got_hw) != tuple(hw):
            raise ShapeError(
                f"shape {tuple(shape)} read as {layout.upper()} does not match target {tuple(hw)}",
                path=path,
            )
        return layout
    if hw is not None:
        is_hwc = tuple(shape[:2]) == tuple(hw)
        is_chw = tuple(shape[1:]) == tuple(hw)
    elif num_classes is not None:
        is_hwc, is_chw = shape[2] == num_classes, shape[0] == num_classes
    else:
        is_hwc = shape[2] < min(shape[0], shape[1])
        is_chw = shape[0] < min(shape[1], shape[2])
    if is_hwc and is_chw:
        raise ShapeError(
            f"layout of shape {tuple(shape)} is ambiguous; pass --layout hwc or --layout chw",
            path=path,
        )
    if not (is_hwc or is_chw):
        against = f"target {tuple(hw)}" if hw is not None else "any class axis"
        raise ShapeError(
            f"shape {tuple(shape)} does not match {against} as (H, W, C) or (C, H, W)",
            path=path,
        )
    return "hwc" if is_hwc else "chw"


@dataclass
class PredictionMap:
    """A prediction (or soft target) map as stored, read block by block in class-major form."""

    path: Path
    array: np.ndarray
    layout: str  # "hwc" | "chw" | "hw"

    @property
    def height(self) -> int:
        return self.array.shape[1] if self.layout == "chw" else self.array.shape[0]

    @property
    def width(self) -> int:
        return self.array.shape[2] if self.layout == "chw" else self.array.shape[1]

    @property
    def num_classes(self) -> int:
        if self.layout == "hw":
            return 2
        return self.array.shape[0] if self.layout == "chw" else self.array.shape[2]

    @property
    def n_pixels(self) -> int:
        return self.height * self.width

    @property
    def compute_dtype(self) -> np.dtype:
        """float64 input stays float64; float16 and float32 are computed in float32."""
        return np.dtype(np.float64 if self.array.dtype == np.float64 else np.float32)

    def _flat(self) -> np.ndarray:
        a = self.array
        if self.layout == "chw":
            return a.reshape(a.shape[0], -1)
        if self.layout == "hwc":
            return a.reshape(-1, a.shape[2])
        return a.reshape(-1)

    def _raw(self) -> tuple[str, int] | None:
        """(file, byte offset) when the array is a C-ordered memory map of a plain file.

        Such blocks are read with ``os.pread`` instead of through the map: the pages a map
        touches stay in the process's resident set until the kernel reclaims them, so
        reading a 4 GB map through it would show 4 GB of RSS. Reads keep it at a chunk.
        """
        a = self.array
        if isinstance(a, np.memmap) and a.flags.c_contiguous and a.filename is not None:
            return a.filename, a.offset
        return None

    def _pread_into(self, fd: int, offset: int, out: np.ndarray) -> None:
        """Fill the contiguous array ``out`` with the bytes at ``offset``."""
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise ReadError(
                    "file ended early: it was truncated while being read", path=self.path
                )
            got += n

    def _read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """The stored values of pixels [start, stop): (n, C) for HWC, (C, n) for CHW, (n,).

        ``out``: a buffer to read a plain file's bytes into when it has the right shape and
        dtype (a worker reuses one for every chunk: no fresh pages to fault in each time).
        """
        if hasattr(self.array, "elements"):  # TIFF bands, a URL's ranges, Zarr chunks
            tiff, n, C = self.array, stop - start, self.num_classes
            if self.layout == "chw":
                HW = self.n_pixels
                out = np.empty((C, n), dtype=tiff.dtype)
                for c in range(C):
                    out[c] = tiff.elements(c * HW + start, c * HW + stop)
                return out
            if self.layout == "hwc":
                return tiff.elements(start * C, stop * C).reshape(n, C)
            return tiff.elements(start, stop)
        source = fortran_rows(self)
        if source is not None:  # a Fortran-order .npy, band by band (fortran.py)
            W = self.width
            r0, r1 = start // W, -(-stop // W)
            band = source.rows(r0, r1)
            a, b = start - r0 * W, stop - r0 * W
            if self.layout == "chw":
                return band.reshape(band.shape[0], -1)[:, a:b]
            if self.layout == "hwc":
                return band.reshape(-1, band.shape[-1])[a:b]
            return band.reshape(-1)[a:b]
        raw = self._raw()
        if raw is None:
            flat = self._flat()
            return flat[:, start:stop] if self.layout == "chw" else flat[start:stop]
        filename, offset = raw
        dtype = self.array.dtype
        n, C = stop - start, self.num_classes
        shape = (C, n) if self.layout == "chw" else (n, C) if self.layout == "hwc" else (n,)
        if out is None or out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
            out = np.empty(shape, dtype=dtype)
        fd = os.open(filename, os.O_RDONLY)
        try:
            if self.layout == "chw":
                for c in range(C):
                    self._pread_into(
                        fd, offset + (c * self.n_pixels + start) * dtype.itemsize, out[c]
                    )
                return out
            width = C if self.layout == "hwc" else 1
            self._pread_into(fd, offset + start * width * dtype.itemsize, out)
            return out
        finally:
            os.close(fd)

    def planes_in_memory(self) -> np.ndarray | None:
        """A CHW map held in memory as float32, as (C, H·W) planes (a view), else None.

        The compiled kernel reads such planes in place instead of copying chunks. Memory
        maps of files are left out: their reads go through ``os.pread`` (see ``_raw``).
        """
        a = self.array
        if (
            self.layout == "chw"
            and type(a) is np.ndarray
            and a.dtype == np.float32
            and a.flags.c_contiguous
        ):
            return a.reshape(a.shape[0], -1)
        return None

    def pixel_rows(self, start: int, stop: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """HWC only: pixels [start, stop) as stored, (n, C) contiguous, in the compute dtype
        (``out``: a buffer to reuse, see ``_read_rows``)."""
        if self.layout != "hwc":
            raise ValueError("pixel_rows serves HWC maps")
        rows = self._read_rows(start, stop, out)
        return np.ascontiguousarray(rows, dtype=self.compute_dtype)

    def block(
        self, start: int, stop: int, *, logits: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Pixels [start, stop) in row-major order as a (C, n) array in the compute dtype
        (``out``: a buffer a CHW file's chunk may be read into, see ``_read_rows``)."""
        dtype = self.compute_dtype
        if self.layout == "chw":
            # A contiguous copy: the class planes of a view lie H·W·itemsize apart, often a
            # power of two, and walking 19 such streams at once thrashes the cache's sets.
            rows = self._read_rows(start, stop, out)
            return (
                rows.astype(dtype, copy=False)
                if rows.flags.c_contiguous
                else np.array(rows, dtype=dtype, order="C")
            )
        if self.layout == "hwc":
            rows = self._read_rows(start, stop)
            out = np.empty((rows.shape[1], rows.shape[0]), dtype=dtype)
            np.copyto(out, rows.T)
            return out
        p1 = np.asarray(self._read_rows(start, stop), dtype=dtype)
        out = np.empty((2, p1.shape[0]), dtype=dtype)
        if logits:  # one logit z of class 1 is the pair (0, z) under softmax
            out[0] = 0.0
        else:
            np.subtract(1.0, p1, out=out[0])
        out[1] = p1
        return out


def prediction_map(path: Path, arr, layout: str) -> PredictionMap:
    """A PredictionMap over an opened array (TIFF bands serve every layout)."""
    path = path if getattr(path, "is_remote", False) else Path(path)
    return PredictionMap(path=path, array=arr, layout=layout)


def open_prediction(
    path: Path,
    *,
    hw: tuple[int, int] | None,
    layout: str | None = None,
    num_classes: int | None = None,
    npz_key: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PredictionMap:
    """Open a prediction map, check its dtype and find its layout against the target's (H, W)."""
    path = path if getattr(path, "is_remote", False) else Path(path)
    arr = load_array(path, npz_key=npz_key, max_pixels=max_pixels)
    _check_float_dtype(arr.dtype, path)
    found = detect_layout(arr.shape, hw, layout=layout, num_classes=num_classes, path=path)
    pm = prediction_map(path, arr, found)
    if pm.n_pixels == 0:
        raise ShapeError(f"shape {tuple(arr.shape)} has no pixels", path=path)
    return pm


# --- targets ------------------------------------------------------------------------------


@contextlib.contextmanager
def _pillow_limit():
    """Pillow's own bomb check off while klseg opens a PNG: klseg checks the header's size
    against --max-pixels itself, right after opening and before decoding anything."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read_png(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image

    try:
        with _pillow_limit(), Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ReadError(
                    f"header claims {w}x{h} pixels, more than --max-pixels {max_pixels}; "
                    "raise --max-pixels if the file is genuine",
                    path=path,
                )
            mode = img.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBX"):
                raise LabelError(
                    f"is a colour ({mode}) mask; save class indices as a grayscale or "
                    "palette PNG (palette index = class id)",
                    path=path,
                )
            img.load()
            if mode == "1":
                return np.asarray(img, dtype=np.uint8)
            arr = np.asarray(img)  # "P" gives palette indices, "L" uint8, "I;16" uint16
    except (ReadError, LabelError):
        raise
    except OSError as err:
        text = _describe_oserror(err) if err.errno else str(err)
        raise ReadError(f"cannot read as PNG ({text})", path=path) from None
    except Exception as err:  # Pillow's DecompressionBombError, SyntaxError, ValueError...
        raise ReadError(f"cannot read as PNG ({type(err).__name__}: {err})", path=path) from None
    return arr


def read_palette(path: Path | None) -> np.ndarray | None:
    """The (256, 3) colours of a palette ("P") PNG target, else None (never an error: the
    colours only dress up a panel)."""
    if path is None or Path(path).suffix.lower() != ".png":
        return None
    from PIL import Image

    try:
        with _pillow_limit(), Image.open(path) as img:
            if img.mode != "P":
                return None
            flat = img.getpalette() or []
    except Exception:
        return None
    colours = np.zeros((256, 3), dtype=np.uint8)
    rgb = np.asarray(flat[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    colours[: len(rgb)] = rgb
    return colours


def read_target(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | LabelBands:
    """Read a label mask: a 2-D array of integer class ids (PNG, .npy, TIFF or Zarr).

    A ``.npy``, TIFF or Zarr mask over ``labelio.WHOLE_LABEL_BYTES`` comes back as a
    ``LabelBands``, read in row ranges as the chunks ask for them. Soft targets are
    probability maps and are opened with ``open_prediction`` instead.
    """
    if getattr(path, "is_remote", False):  # a URL (remote.RemotePath): read whole, checked
        return path.read_target(max_pixels=max_pixels)
    path = Path(path)
    if path.suffix.lower() == ".zarr":
        from .zarrio import open_zarr, read_zarr_target

        source = open_zarr(path, max_pixels=max_pixels)
        if banded(source.shape, source.dtype):
            return LabelBands(path, source)
        return read_zarr_target(path, max_pixels=max_pixels)
    check_regular(path)  # a FIFO or /dev/zero is refused, never opened (it would block)
    suffix = path.suffix.lower()
    if suffix == ".png":
        return _read_png(path, max_pixels)
    if suffix not in (".npy", ".tif", ".tiff", ".npz"):
        raise ReadError(f"unsupported target file type {suffix!r}", path=path)
    if suffix == ".npy":  # read whole with pread: no memory map to SIGBUS on truncation
        arr = read_label_npy(path, max_pixels=max_pixels)
    elif suffix in (".tif", ".tiff"):  # decoded whole: any compression, tiles or strips
        arr = read_label_tiff(path, max_pixels=max_pixels)
    else:
        arr = load_array(path, max_pixels=max_pixels)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
        raise LabelError(
            f"is a colour mask of shape {tuple(arr.shape)}; save class indices (H, W)", path=path
        )
    if arr.ndim == 3 and arr.dtype.kind == "f":
        raise ShapeError(
            f"holds a {arr.dtype} map of shape {tuple(arr.shape)}, not a label mask: pass "
            "--soft-gt if it is a soft target (or check that PRED and GT are not swapped)",
            path=path,
        )
    if arr.ndim != 2:
        hint = "; a volume's labels need --spatial-dims 3" if arr.ndim == 3 else ""
        raise ShapeError(
            f"a label mask must be 2-D (H, W), got shape {tuple(arr.shape)}{hint}", path=path
        )
    if arr.dtype.kind == "f":
        raise LabelError(
            f"holds {arr.dtype} values; labels must be integers (pass --soft-gt for a soft "
            "target map)",
            path=path,
        )
    if arr.dtype.kind == "b":
        return np.asarray(arr, dtype=np.uint8)
    if arr.dtype.kind not in "iu":
        raise LabelError(f"holds {arr.dtype} values; labels must be integers", path=path)
    return arr if isinstance(arr, LabelBands) else np.asarray(arr)
