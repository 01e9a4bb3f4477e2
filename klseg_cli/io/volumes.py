"""3-D volumes: NIfTI files (nibabel) and ``.npy``/``.npz`` with ``--spatial-dims 3`` (DESIGN §10).

Every per-voxel metric is a sum over voxels in any order, so a volume is served to the rest
of klseg as a 2-D image: (A, B, D) spatial axes become A·B rows of D voxels, the class axis
kept first or last. That is a reshape, a view: a memory-mapped ``.npy`` or ``.nii`` stays
memory-mapped and is read chunk by chunk (``readers.PredictionMap``), nothing else changes.

NIfTI stores voxels in Fortran order (x fastest). Its array transposed, (C, Z, Y, X), is the
same bytes in C order, so klseg works on that view: internal axes reversed, spacing reversed
with them (boundary metrics do not depend on the axis order, only on the spacing per axis).
A Fortran-order ``.npy`` volume is taken the same way. The target, read whole into memory
(labels are small), is transposed to the prediction's order when the two differ.

Memory: an uncompressed ``.nii`` is memory-mapped (bounded by the chunk size); a ``.nii.gz``
is decompressed once into memory by nibabel, so it needs its uncompressed size in RAM
(X·Y·Z·C·itemsize: 256×256×128×4 float32 = 128 MiB). Label volumes are read whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.results import ReadOptions
from ..errors import LabelError, ReadError, ShapeError, UsageError
from .pairing import OpenedPair, Pair
from .readers import PredictionMap, _check_float_dtype, load_array
from .safeio import check_regular

NIFTI_SUFFIXES = (".nii", ".nii.gz")
AFFINE_ATOL = 1e-4
"""Affines and spacings closer than this (mm) are the same grid (float32 headers)."""


def is_nifti(path) -> bool:
    """Whether a path (local, or a remote one's name) is a NIfTI file by its name."""
    return path is not None and str(path.name).lower().endswith(NIFTI_SUFFIXES)


def is_volume_pair(pair: Pair, read: ReadOptions) -> bool:
    """Whether a pair is read as volumes: NIfTI files, or ``--spatial-dims 3``."""
    return getattr(read, "spatial_dims", 2) == 3 or is_nifti(pair.pred) or is_nifti(pair.target)


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise UsageError(
            "reading NIfTI files needs nibabel: pip install 'klseg[medical]'"
        ) from None
    return nibabel


@dataclass
class Volume:
    """An opened volume in klseg's internal axis order (see the module docstring)."""

    path: Path
    array: np.ndarray  # internal order; C-contiguous when memory-mapped
    reversed: bool  # internal axes are the file's reversed
    spacing: tuple[float, ...] | None  # spatial spacing in the file's order (NIfTI header)
    affine: np.ndarray | None

    @property
    def file_shape(self) -> tuple[int, ...]:
        return self.array.shape[::-1] if self.reversed else self.array.shape


def load_nifti(path: Path, *, max_pixels: int) -> Volume:
    """Open a NIfTI file: a memory map of an uncompressed one, else decoded into memory."""
    nib = _nibabel()
    path = Path(path)
    check_regular(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except FileNotFoundError:
        raise ReadError("no such file", path=path) from None
    except OSError as err:
        raise ReadError(f"cannot read: {err.strerror or err}", path=path) from None
    except Exception as err:  # nibabel's ImageFileError, struct errors on damaged headers
        raise ReadError(
            f"not a valid NIfTI file ({type(err).__name__}: {err})", path=path
        ) from None
    if len(shape) == 5 and shape[3] == 1:  # (X, Y, Z, 1, C): NIfTI's vector intent layout
        shape = shape[:3] + shape[4:]
    if len(shape) not in (3, 4):
        raise ShapeError(
            f"NIfTI shape {shape}: expected a label volume (X, Y, Z) or a map (X, Y, Z, C)",
            path=path,
        )
    voxels = math.prod(shape[:3])
    if voxels > max_pixels:
        raise ReadError(
            f"header claims shape {shape}, {voxels:,} voxels, more than --max-pixels "
            f"{max_pixels:,}; raise --max-pixels if the file is genuine",
            path=path,
        )
    try:
        data = np.asanyarray(img.dataobj)  # a memory map when uncompressed and unscaled
    except Exception as err:
        raise ReadError(
            f"cannot read the NIfTI data ({type(err).__name__}: {err})", path=path
        ) from None
    data = data.reshape(shape, order="F") if data.shape != shape else data
    return Volume(path, data.T, True, zooms[:3], np.asarray(img.affine, dtype=np.float64))


def load_npy_volume(path: Path, *, npz_key: str | None, max_pixels: int) -> Volume:
    """A ``.npy``/``.npz`` volume (``--spatial-dims 3``); a Fortran-order one is reversed."""
    arr = load_array(path, npz_key=npz_key, max_pixels=max_pixels)
    if isinstance(arr, np.ndarray) and arr.flags.f_contiguous and not arr.flags.c_contiguous:
        return Volume(Path(path), arr.T, True, None, None)
    return Volume(Path(path), arr, False, None, None)


def open_volume(path: Path, read: ReadOptions) -> Volume:
    if is_nifti(path):
        return load_nifti(path, max_pixels=read.max_pixels)
    if Path(path).suffix.lower() not in (".npy", ".npz"):
        raise ReadError(
            f"a volume must be NIfTI (.nii, .nii.gz), .npy or .npz, not {Path(path).suffix!r}",
            path=path,
        )
    return load_npy_volume(path, npz_key=read.npz_key, max_pixels=read.max_pixels)


def header_map(path: Path, read: ReadOptions, num_classes: int) -> PredictionMap:
    """A stand-in PredictionMap of a volume's size and dtype, from its header alone (a
    ``.nii.gz`` is not decompressed): what ``--jobs`` needs to pick workers."""
    if is_nifti(path):
        nib = _nibabel()
        try:
            header = nib.load(str(path)).header
            shape, dtype = tuple(header.get_data_shape()), header.get_data_dtype()
        except Exception as err:
            raise ReadError(f"not a valid NIfTI file ({type(err).__name__})", path=path) from None
    else:
        arr = load_array(path, npz_key=read.npz_key, max_pixels=read.max_pixels)
        shape, dtype = tuple(arr.shape), arr.dtype
    voxels = math.prod(shape) // num_classes if len(shape) >= 4 else math.prod(shape)
    size_only = np.broadcast_to(np.zeros((), dtype=dtype), (voxels, 1, num_classes))  # no memory
    return PredictionMap(path=Path(path), array=size_only, layout="hwc")


def _labels(vol: Volume) -> np.ndarray:
    """Integer labels of a label volume (NIfTI often stores them as floats: whole numbers
    are accepted, anything else is an error)."""
    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise ShapeError(
            f"a label volume must be 3-D (X, Y, Z), got shape {vol.file_shape}", path=vol.path
        )
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return np.array(arr)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all() or not np.array_equal(arr, np.round(arr)):
            bad = arr[~finite | (arr != np.round(arr))]
            raise LabelError(
                f"label volume holds {bad.size:,} non-integer values (e.g. {bad.flat[0]!r}); "
                "labels must be whole numbers (pass --soft-gt for a soft target)",
                path=vol.path,
            )
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        dtype = np.int16 if -(2**15) <= lo and hi < 2**15 else np.int64
        return arr.astype(dtype)
    raise LabelError(f"holds {arr.dtype} values; labels must be integers", path=vol.path)


def _check_grids(pred: Volume, target: Volume, read: ReadOptions) -> None:
    """Prediction and target must lie on the same voxel grid (same spacing and affine)."""
    if read.allow_affine_mismatch:
        return
    if pred.spacing is not None and target.spacing is not None:
        if not np.allclose(pred.spacing, target.spacing, atol=AFFINE_ATOL, rtol=0):
            raise ShapeError(
                f"voxel spacing {_fmt(pred.spacing)} differs from the target's "
                f"{_fmt(target.spacing)} ({target.path}); resample one of them, or pass "
                "--allow-affine-mismatch",
                path=pred.path,
            )
    if pred.affine is not None and target.affine is not None:
        if not np.allclose(pred.affine, target.affine, atol=AFFINE_ATOL, rtol=0):
            raise ShapeError(
                f"affine differs from the target's ({target.path}): the volumes are not on "
                "the same grid; resample one of them, or pass --allow-affine-mismatch",
                path=pred.path,
            )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass
class VolumePair(OpenedPair):
    """An opened volume pair: ``spatial``/``spacing`` in the internal order, ``file_shape``
    in the file's (what reports show), ``reversed`` whether the two differ."""

    file_shape: tuple[int, ...] | None = None
    reversed: bool = False
    file_pred: np.ndarray | None = None  # the map in the file's axis order (a view)
    file_layout: str = "hwc"  # where its class axis is: "hwc" last, "chw" first, "hw" none
    file_labels: np.ndarray | None = None  # the labels in the file's axis order (a view)


def _class_axis(shape: tuple[int, ...], spatial: tuple[int, ...], read, path) -> str:
    """``"hwc"`` (class axis last), ``"chw"`` (first) or ``"hw"`` (a 3-D binary map)."""
    if len(shape) == 3:
        if shape != spatial:
            raise ShapeError(f"shape {shape} does not match the target volume {spatial}", path=path)
        return "hw"
    if len(shape) != 4:
        raise ShapeError(
            f"has {len(shape)} dimensions {shape}; a volume map is (X, Y, Z, C) or (C, X, Y, Z)",
            path=path,
        )
    if read.layout is not None:
        layout = read.layout.lower()
        if layout not in ("hwc", "chw"):
            raise UsageError(f"--layout must be hwc or chw, got {read.layout!r}")
        got = shape[:3] if layout == "hwc" else shape[1:]
        if got != spatial:
            raise ShapeError(f"shape {shape} does not match the target volume {spatial}", path=path)
        return layout
    last, first = shape[:3] == spatial, shape[1:] == spatial
    if last and first:
        raise ShapeError(
            f"class axis of shape {shape} is ambiguous; pass --layout hwc (last) or chw (first)",
            path=path,
        )
    if not (last or first):
        raise ShapeError(f"shape {shape} does not match the target volume {spatial}", path=path)
    return "hwc" if last else "chw"


def _as_image(arr: np.ndarray, layout: str) -> np.ndarray:
    """The (A, B, D) spatial axes as A·B rows of D: a view of a C-contiguous array."""
    if layout == "chw":
        c, a, b, d = arr.shape
        return arr.reshape(c, a * b, d)
    a, b, d = arr.shape[:3]
    return arr.reshape((a * b, d, *arr.shape[3:]))


def open_volume_pair(
    pair: Pair, *, soft_gt: bool, num_classes: int | None, read: ReadOptions
) -> VolumePair:
    """Open a volume prediction and its label volume as a 2-D pair (see the docstring)."""
    if soft_gt:
        raise UsageError("--soft-gt is not supported for volumes yet; pass label volumes")
    if pair.target is None:
        raise UsageError(f"{pair.pred}: evaluating a volume needs its label volume")
    pred = open_volume(pair.pred, read)
    _check_float_dtype(pred.array.dtype, pair.pred)
    target = open_volume(pair.target, read)
    labels = _labels(target)
    if target.reversed != pred.reversed:  # the target follows the prediction's axis order
        labels = np.ascontiguousarray(labels.T)
    _check_grids(pred, target, read)
    spatial = tuple(labels.shape)
    layout = _class_axis(tuple(pred.array.shape), spatial, read, pair.pred)
    pm = PredictionMap(path=pair.pred, array=_as_image(pred.array, layout), layout=layout)
    if pm.n_pixels == 0:
        raise ShapeError(f"shape {pred.file_shape} has no voxels", path=pair.pred)
    if num_classes is not None and pm.num_classes != num_classes:
        raise ShapeError(
            f"has {pm.num_classes} classes (shape {pred.file_shape}), expected {num_classes}",
            path=pair.pred,
        )
    spacing = pred.spacing or target.spacing
    if spacing is not None and pred.reversed:
        spacing = tuple(spacing[::-1])
    file_shape = spatial[::-1] if pred.reversed else spatial
    file_layout = {"hwc": "chw", "chw": "hwc", "hw": "hw"}[layout] if pred.reversed else layout
    return VolumePair(
        pm, labels.reshape(pm.height, pm.width), pm.height, pm.width,
        spatial=spatial, spacing=spacing, file_shape=file_shape, reversed=pred.reversed,
        file_pred=pred.array.T if pred.reversed else pred.array, file_layout=file_layout,
        file_labels=labels.T if pred.reversed else labels,
    )  # fmt: skip


def nifti_facts(path: Path, *, max_pixels: int, map_facts, label_facts) -> dict:
    """``klseg info`` of a NIfTI file: header facts, then a label volume's values or a
    map's value range and voxel sums (read chunk by chunk, as evaluate reads it)."""
    vol = load_nifti(path, max_pixels=max_pixels)
    facts: dict = {
        "format": "nifti (.nii.gz)" if str(path).lower().endswith(".gz") else "nifti (.nii)",
        "shape": vol.file_shape,
        "dtype": str(vol.array.dtype),
        "voxel spacing": _fmt(vol.spacing) if vol.spacing else "none",
        "affine": np.array2string(vol.affine, precision=4, suppress_small=True).replace("\n", ""),
        "read as": "from the file, a chunk at a time"
        if isinstance(vol.array, np.memmap)
        else "whole, into memory (decompressed)",
    }
    if vol.array.ndim == 3:
        try:
            labels = _labels(vol)
        except LabelError as err:
            return {**facts, "verdict": err.message}
        facts["read as"] = "whole, into memory (a label volume)"
        return {**facts, **label_facts(labels)}
    try:
        _check_float_dtype(vol.array.dtype, path)
    except ReadError as err:
        return {**facts, "verdict": err.message}
    pm = PredictionMap(path=Path(path), array=_as_image(vol.array, "chw"), layout="chw")
    out = {**facts, "layout": "X, Y, Z, C (NIfTI)", **map_facts(pm)}
    out.pop("height x width", None)  # the (X·Y) × Z view evaluate reads, not the volume's
    return out


# --- heatmaps of volumes: a slice, or a montage of slices ------------------------------------

AXES = "xyz"


@dataclass(frozen=True)
class SliceView:
    """Which 2-D sections of a volume ``klseg heatmap`` draws (``--slice``, ``--montage``)."""

    axis: int = 2  # a file axis: 0 = x, 1 = y, 2 = z
    index: int | None = None  # None: the middle slice
    montage: int | None = None  # N evenly spaced slices in one picture

    @classmethod
    def parse(cls, spec: str | None, montage: int | None) -> SliceView:
        """``--slice z=40`` (or ``x=``/``y=``; ``z`` alone picks the axis for --montage)."""
        if montage is not None and montage < 1:
            raise UsageError(f"--montage must be at least 1, got {montage}")
        if not spec:
            return cls(montage=montage)
        name, _, index = spec.strip().lower().partition("=")
        if name not in AXES or (index and not index.strip().lstrip("-").isdigit()):
            raise UsageError(f"--slice must look like z=40 (axis x, y or z), got {spec!r}")
        if index and montage is not None:
            raise UsageError(
                "--slice AXIS=INDEX draws one slice; with --montage give the axis only"
            )
        return cls(AXES.index(name), int(index) if index else None, montage)

    def indices(self, n: int, path) -> list[int]:
        if self.montage is not None:  # the centres of N equal parts: no empty end slices
            return sorted(
                {min(n - 1, int((k + 0.5) * n / self.montage)) for k in range(self.montage)}
            )
        index = n // 2 if self.index is None else self.index
        if not -n <= index < n:
            raise UsageError(
                f"{path}: --slice {AXES[self.axis]}={index} is outside the volume "
                f"(0..{n - 1} along {AXES[self.axis]})"
            )
        return [index % n]


def slice_pair(opened: VolumePair, axis: int, index: int) -> OpenedPair:
    """One 2-D section of an opened volume pair, copied into memory (one slice's values)."""
    a = opened.file_pred
    class_axis = {"hwc": 3, "chw": 0, "hw": None}[opened.file_layout]
    along = axis + 1 if class_axis == 0 else axis
    section = np.ascontiguousarray(np.take(a, index, axis=along))
    layout = opened.file_layout
    pm = PredictionMap(path=opened.pred.path, array=section, layout=layout)
    labels = np.ascontiguousarray(np.take(opened.file_labels, index, axis=axis))
    return OpenedPair(pm, labels, pm.height, pm.width)
