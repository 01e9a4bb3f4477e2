"""Write calibrated maps (``klseg calibrate --write``): same names, format, dtype and layout.

Each map is computed chunk by chunk (``calibration.scaled_chunk``: softmax(log p̃ / T) for
probabilities, log p̃ / T for logits, every pixel including ignored ones) and written to a
temporary file that is renamed into place when complete:

- ``.npy``: the header, then each chunk with ``os.pwrite`` at its offset (memory: a chunk);
- ``.npz``: that ``.npy`` streamed into a zip archive under the same key, compressed when
  the input was;
- ``.tif``: that ``.npy`` (a temporary file) streamed into a TIFF with the input's
  arrangement (one page per class, or one page of C samples) and compression, one class
  plane or one row at a time.

Numbers computed by ``evaluate --temperature T`` equal those of the written maps (the
chunks are rounded to the stored dtype in both cases).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.metrics import MetricSettings
from ..errors import KlsegError, ReadError, UsageError
from ..io.atomic import atomic_path


def _write_npy(pred, settings: MetricSettings, path: Path, chunk_pixels: int) -> None:
    """The calibrated map as a .npy of the input's shape and dtype, chunk by chunk."""
    from ..core.calibration import scaled_chunk
    from ..core.chunks import chunk_for
    from ..io.readers import sum_tolerance

    arr = pred.array
    dtype, shape = np.dtype(arr.dtype), tuple(arr.shape)
    logits = settings.input_kind == "logits"
    tolerance = None if logits else sum_tolerance(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}  # fmt: skip
    n, C = pred.n_pixels, pred.num_classes
    step = chunk_for(chunk_pixels, C)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, header)
        offset = fh.tell()
        fh.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
        fd = fh.fileno()
        for start in range(0, n, step):
            stop = min(start + step, n)
            P = pred.block(start, stop, logits=logits)
            try:
                Q, _ = scaled_chunk(P, settings, dtype, tolerance, two_d=pred.layout == "hw")
            except KlsegError as err:
                raise err.with_path(pred.path) from None
            if pred.layout == "hwc":
                data = np.ascontiguousarray(Q.T, dtype=dtype)
                os.pwrite(fd, data.tobytes(), offset + start * C * dtype.itemsize)
            elif pred.layout == "chw":
                for c in range(C):
                    os.pwrite(fd, Q[c].astype(dtype).tobytes(),
                              offset + (c * n + start) * dtype.itemsize)  # fmt: skip
            else:  # a 2-D map: P(class 1), or the logit of class 1 against class 0
                os.pwrite(fd, Q[1].astype(dtype).tobytes(), offset + start * dtype.itemsize)


def _npz_member(path: Path, key: str | None) -> tuple[str, int]:
    """(key, zip compression) of the array a .npz prediction was read from."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
    if key is None:
        key = next(iter(infos))
    return key, infos[key].compress_type


def _write_tiff(src_npy: Path, original: Path, path: Path) -> None:
    """Stream a temporary .npy into a TIFF arranged and compressed like ``original``."""
    import tifffile

    with tifffile.TiffFile(original) as tif:
        page = tif.pages[0]
        n_pages = len(tif.pages)
        compression = page.compression
        predictor = page.predictor
    arr = np.load(src_npy, mmap_mode="r")
    kw = {"photometric": "minisblack", "shape": arr.shape, "dtype": arr.dtype}
    if int(compression) != 1:
        kw["compression"] = compression
        if int(predictor) != 1:
            kw["predictor"] = predictor
    if arr.ndim == 3 and n_pages == 1:  # (H, W, C): one page of C contiguous samples
        kw["planarconfig"] = "contig"
    data = (np.array(arr[i]) for i in range(arr.shape[0]))  # one plane or row at a time
    tifffile.imwrite(path, data=data, **kw)


def check_write_folder(pairs: Sequence, out: Path) -> None:
    """A UsageError, before any work, if ``--write`` could not take every map: a file, two
    maps with one name, or a map's name taken already (klseg replaces nothing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--write {out} is an existing file; give a folder")
    names = [Path(p.pred).name for p in pairs]
    if len(set(names)) != len(names):
        raise UsageError("--write: two predictions have the same file name")
    for name in names:
        if (out / name).exists():
            raise UsageError(f"--write: {out / name} exists already; give an empty folder")


def write_calibrated(
    pairs: Sequence,
    settings: MetricSettings,
    read,
    out: Path,
    *,
    on_image=None,
) -> list[Path]:
    """Write the calibrated map of every pair's prediction into ``out`` (same file names).

    All or nothing: every map goes to a temporary file first and they are renamed into
    place only when all are complete (a bad value anywhere, even under an ignored pixel,
    is an error here: the written map must be a map). Refuses to replace any existing file
    (klseg never overwrites what it did not create): give an empty or new folder.
    """
    from ..io.opening import open_pair

    out = Path(out)
    check_write_folder(pairs, out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--write {out}: cannot create folder ({err.strerror or err})") from None
    written = []
    try:
        with contextlib.ExitStack() as stack:
            for pair in pairs:
                opened = open_pair(pair, soft_gt=settings.soft_gt,
                                   num_classes=settings.num_classes, read=read)  # fmt: skip
                dest = out / Path(pair.pred).name
                tmp = stack.enter_context(atomic_path(dest))
                _write_one(opened.pred, pair, settings, read, out, dest, tmp)
                written.append(dest)
                if on_image is not None:
                    on_image(pair)
            # leaving the stack renames every file, or on an error removes every temporary
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return written


def _write_one(pred, pair, settings: MetricSettings, read, out: Path, dest: Path, tmp: Path):
    """One calibrated map into the temporary file ``tmp`` (named for ``dest``)."""
    suffix = dest.suffix.lower()
    if suffix == ".npy":
        _write_npy(pred, settings, tmp, read.chunk_pixels)
        return
    fd, scratch = tempfile.mkstemp(suffix=".npy", dir=out, prefix=".klseg-")
    os.close(fd)
    try:
        _write_npy(pred, settings, Path(scratch), read.chunk_pixels)
        if suffix == ".npz":
            key, compression = _npz_member(pair.pred, read.npz_key)
            with zipfile.ZipFile(tmp, "w", compression=compression, allowZip64=True) as zf:
                zf.write(scratch, arcname=f"{key}.npy")
        elif suffix in (".tif", ".tiff"):
            _write_tiff(Path(scratch), Path(pair.pred), tmp)
        else:
            raise ReadError(f"cannot write {suffix} files", path=dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
