"""read → chunk → per-pixel terms → sums → merge → results, for one image and for a folder."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.boundary import BoundaryOptions
from ..core.labels import LabelMap, default_ignore_index, load_label_map
from ..core.metrics import DEFAULT_EPS, MetricSettings, PixelTerms, check_probabilities, pixel_terms
from ..core.stats import (
    IMAGE_COLUMNS,
    Stats,
    class_means_cover,
    class_metrics,
    dataset_metrics,
    image_class_rows,
    pixel_metrics,
)
from ..errors import InputError, KlsegError, KlsegWarning, ShapeError, UsageError
from ..io.network import NetworkSettings
from ..io.pairing import Pair, Pairing, pair_files
from ..io.readers import (
    DEFAULT_MAX_PIXELS,
    PredictionMap,
    load_array,
    open_prediction,
    read_target,
    sum_tolerance,
)
from ..io.safeio import exists, read_small_text

DEFAULT_CHUNK_PIXELS = 1 << 15
"""Pixels per chunk: 32768 × 19 classes × 4 bytes ≈ 2.5 MB, about an L2/L3 cache's worth."""
FAST_MIN_VALUES = 1 << 23
"""Maps with at least this many values (8.4M: a 1024×2048 map has 40M) use the compiled
kernel when it is installed; smaller ones are done before numba would have loaded."""
MAX_CHUNK_ELEMENTS = 1 << 22
"""A chunk never holds more values than this (16 MB of float32), however many classes."""


def chunk_for(chunk_pixels: int, num_classes: int) -> int:
    """Pixels per chunk for a map with ``num_classes`` classes: memory stays bounded."""
    if chunk_pixels < 1:
        raise UsageError(f"chunk size must be positive, got {chunk_pixels}")
    return max(1, min(chunk_pixels, MAX_CHUNK_ELEMENTS // max(num_classes, 1)))


@dataclass(frozen=True)
class ReadOptions:
    """How files are read (nothing here changes a number)."""

    layout: str | None = None
    npz_key: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS
    accelerate: bool | None = None  # the compiled kernel: None = for large maps
    spatial_dims: int = 2  # 3: .npy/.npz volumes (X, Y, Z[, C]); NIfTI files are always 3
    allow_affine_mismatch: bool = False  # NIfTI pairs whose affines or spacings differ
    network: NetworkSettings | None = None  # remote reads' bounds (None: the environment's)
    strict_zarr: bool = False  # a missing Zarr chunk is an error, not the fill value
    read_ahead: bool = False  # a thread reads the next chunk during the kernel (one worker)


def use_read_options(read: ReadOptions) -> None:
    """Make a run's network bounds and Zarr strictness this process's: the client calls it
    before it lists and opens anything, a worker (process or Dask) before its task reads."""
    from ..io import network, zarrio

    network.use(read.network)
    zarrio.use_strict(read.strict_zarr)


@dataclass
class ImageResult:
    stem: str
    pred_path: Path
    target_path: Path | None
    height: int
    width: int
    stats: Stats
    shape: tuple[int, ...] | None = None  # a volume's (X, Y, Z) (volumes.py); None: (H, W)
    boundary: dict[str, np.ndarray] | None = None  # --boundary: {metric: (C,)} (boundary.py)
    zarr_missing: dict | None = None  # {store: (missing chunk keys, fill value)} (zarrio.py)

    def row(self, settings: MetricSettings) -> dict:
        """This image's ``per_image.csv`` row."""
        values = pixel_metrics(self.stats, settings)
        row = {
            "image": self.stem,
            "height": self.height,
            "width": self.width,
            "n_valid": self.stats.n_valid,
        }
        row.update({k: values[k] for k in IMAGE_COLUMNS[4:]})
        if settings.uncertainty:  # --uncertainty: mean score, AUROC ... (uncertainty.py)
            from ..core.uncertainty import stats_image_values

            row.update(stats_image_values(self.stats, settings))
        if self.shape is not None or self.boundary is not None:
            from ..core.boundary import image_values
            from ..io.volumes import shape_columns

            row.update(shape_columns(self.shape))
            row.update(image_values(self.boundary) if self.boundary is not None else {})
        return row


@dataclass
class EvaluationResult:
    settings: MetricSettings
    images: list[ImageResult]
    missing_predictions: list[Path] = field(default_factory=list)
    unpaired_predictions: list[Path] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    read: ReadOptions = field(default_factory=ReadOptions)

    @classmethod
    def of(cls, job: Job, images: list[ImageResult], errors: list[dict]) -> EvaluationResult:
        """The result of a job's images (local or from a cluster) and input errors."""
        return cls(
            settings=job.settings,
            images=images,
            missing_predictions=job.pairing.missing_pred,
            unpaired_predictions=job.pairing.missing_target,
            errors=errors,
            read=job.read,
        )

    @property
    def total(self) -> Stats:
        total = Stats.zeros(self.settings.num_classes, self.settings.ece_bins)
        for image in self.images:
            total = total + image.stats
        return total

    def image_rows(self) -> list[dict]:
        return [image.row(self.settings) for image in sorted(self.images, key=lambda i: i.stem)]

    def class_rows(self) -> list[dict]:
        return _with_boundary_means(class_metrics(self.total, self.settings), self)

    def image_class_rows(self) -> list[dict]:
        """Rows of ``per_image_class.csv``: every class of every image, in stem order."""
        rows = []
        for image in sorted(self.images, key=lambda i: i.stem):
            own = image_class_rows(image.stem, image.stats, self.settings)
            for metric, values in (image.boundary or {}).items():
                for row, value in zip(own, values):
                    row[metric] = float(value)
            rows.extend(own)
        return rows

    def summary(self) -> dict:
        """The ``summary.json`` object (DESIGN §5); NaN stays NaN until it is written."""
        total = self.total
        images = self.image_rows()
        return {
            "klseg_version": __version__,
            "settings": self.settings.as_dict(),
            "n_images": len(self.images),
            "n_valid": total.n_valid,
            "n_clipped": total.n_clipped,
            "unit": self.settings.unit,
            "class_means": class_means_cover(self.settings),
            "dataset": _with_boundary_dataset(
                dataset_metrics(images, total, self.settings), self, images
            ),
            "classes": _with_boundary_means(class_metrics(total, self.settings), self),
            **_uncertainty_section(total, self.settings),
            "images": images,
            "requirements": [],
            "missing_predictions": [str(p) for p in self.missing_predictions],
            "errors": list(self.errors),
            "zarr_missing_chunks": zarr_missing_summary(self.images),
        }

    def warn_missing_chunks(self) -> None:
        """One warning per Zarr store that had chunks missing (read as the fill value)."""
        from ..io.zarrio import missing_message

        for entry in zarr_missing_summary(self.images)["files"]:
            message = missing_message(entry["file"], entry["chunks"], entry["fill_value"])
            warnings.warn(message, KlsegWarning, stacklevel=2)


def merge_missing(into: dict | None, more: dict | None) -> dict | None:
    """Two ``ImageResult.zarr_missing`` records as one (the chunk keys united)."""
    if not more:
        return into
    out = dict(into or {})
    for store, (keys, fill) in more.items():
        held = out.get(store)
        out[store] = (keys | held[0], fill) if held else (keys, fill)
    return out


def zarr_missing_summary(images) -> dict:
    """summary.json's ``zarr_missing_chunks``: the total and, per store, how many chunks
    were missing and the fill value they were read as."""
    stores: dict | None = None
    for image in images:
        stores = merge_missing(stores, image.zarr_missing)
    files = [
        {"file": store, "chunks": len(keys), "fill_value": fill}
        for store, (keys, fill) in sorted((stores or {}).items())
    ]
    return {"total": sum(f["chunks"] for f in files), "files": files}


def _uncertainty_section(total: Stats, settings: MetricSettings) -> dict:
    """``--uncertainty``: summary.json's ``uncertainty`` object (bounds, thresholds)."""
    if not settings.uncertainty:
        return {}
    from ..core.uncertainty import summary_section

    return {"uncertainty": summary_section(total, settings)}


def _with_boundary_means(rows: list[dict], result: EvaluationResult) -> list[dict]:
    """``--boundary``: each class row gets the mean of its per-image boundary values."""
    if result.settings.boundary is None:
        return rows
    from ..core.boundary import class_means

    means = class_means(
        [i.boundary for i in result.images if i.boundary is not None], result.settings.num_classes
    )
    for c, row in enumerate(rows):
        row.update({metric: values[c] for metric, values in means.items()})
    return rows


def _with_boundary_dataset(dataset: dict, result: EvaluationResult, image_rows) -> dict:
    """``--boundary``: ``hd95_image_mean`` ... over the images where each is defined."""
    if result.settings.boundary is None:
        return dataset
    from ..core.boundary import dataset_values

    return dataset | dataset_values(image_rows)


def iter_chunks(
    pred: PredictionMap,
    target: np.ndarray | PredictionMap,
    settings: MetricSettings,
    *,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    target_path: Path | None = None,
) -> Iterator[tuple[int, int, np.ndarray | None, np.ndarray, np.ndarray]]:
    """The chunks of one image: ``(start, stop, valid, P, target)``.

    Pixels [start, stop) in row-major order; ``valid`` masks the non-ignored ones (None when
    all are); ``P`` (C, n) and ``target`` hold the valid pixels only. Labels are checked
    first and soft targets chunk by chunk, so a bad target fails before any metric.
    """
    chunk_pixels = chunk_for(chunk_pixels, pred.num_classes)
    logits = settings.input_kind == "logits"
    n = pred.n_pixels
    if isinstance(target, PredictionMap):
        soft_tol = sum_tolerance(target.array.dtype)
        for start in range(0, n, chunk_pixels):
            stop = min(start + chunk_pixels, n)
            Q = target.block(start, stop)
            try:
                check_probabilities(Q, Q.sum(axis=0), tolerance=soft_tol, soft_target=True)
            except KlsegError as err:
                raise err.with_path(target.path) from None
            yield start, stop, None, pred.block(start, stop, logits=logits), Q
        return
    labels = target.reshape(-1)
    settings.labels.check(labels, target_path)
    for start in range(0, n, chunk_pixels):
        stop = min(start + chunk_pixels, n)
        P = pred.block(start, stop, logits=logits)
        valid, P, y = _valid_pixels(P, settings.labels.codes(labels[start:stop]))
        yield start, stop, valid, P, y


def _valid_pixels(P: np.ndarray, codes: np.ndarray):
    """``(valid, P, y)``: a (C, n) chunk and its class codes cut to the non-ignored pixels,
    and the mask that did it (None when every pixel is valid; labels are checked already)."""
    mask = codes >= 0
    y = codes.astype(np.intp)
    if mask.all():
        return None, P, y
    return mask, P.compress(mask, axis=1), y[mask]  # C order (P[:, mask] is Fortran's)


def iter_terms(
    pred: PredictionMap,
    target: np.ndarray | PredictionMap,
    settings: MetricSettings,
    *,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    target_path: Path | None = None,
) -> Iterator[tuple[int, int, np.ndarray | None, PixelTerms]]:
    """Per-pixel terms of one image, chunk by chunk: ``(start, stop, valid, terms)``."""
    tolerance = _tolerance(pred, settings)
    for start, stop, valid, P, tgt in iter_chunks(
        pred, target, settings, chunk_pixels=chunk_pixels, target_path=target_path
    ):
        yield start, stop, valid, _terms(pred, P, tgt, settings, tolerance)


def _tolerance(pred: PredictionMap, settings: MetricSettings) -> float | None:
    return None if settings.input_kind == "logits" else sum_tolerance(pred.array.dtype)


def image_stats(
    pred: PredictionMap,
    target: np.ndarray | PredictionMap,
    settings: MetricSettings,
    *,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    target_path: Path | None = None,
    accelerate: bool | None = None,
    read_ahead: bool = False,
) -> Stats:
    """The sums of one image: the compiled kernel where it applies, else the NumPy path.

    ``accelerate``: True forces the kernel where it applies, False never uses it, None (the
    default) uses it for maps of at least FAST_MIN_VALUES values. Importing numba and
    loading its compiled code costs about a second, more than small maps take in NumPy.
    ``read_ahead``: with the kernel, a second thread reads the next chunk of a file while
    the kernel computes this one (``_chunks_read_ahead``); worth it for one worker only.
    """
    tolerance = _tolerance(pred, settings)
    if not isinstance(target, PredictionMap) and uses_kernel(pred, settings, accelerate):
        return _fast_image_stats(
            pred, target, settings, chunk_pixels, target_path, tolerance, read_ahead=read_ahead
        )
    total = Stats.zeros(settings.num_classes, settings.ece_bins)
    views = _views(pred, target, settings, accelerate) if settings.calibration_views else None
    for start, stop, valid, P, tgt in iter_chunks(
        pred, target, settings, chunk_pixels=chunk_pixels, target_path=target_path
    ):
        terms = _terms(pred, P, tgt, settings, tolerance)
        chunk = Stats.from_terms(terms, settings)
        if views is not None:
            views(chunk, terms, start, stop, valid)
        total = total + chunk
    return total


def _views(pred: PredictionMap, target, settings: MetricSettings, accelerate):
    """A function adding a chunk's calibration-view sums (``--calibration-views``): the
    boundary band from the label image, the class-wise bins compiled for large maps."""
    from ..core import _fast
    from ..core.calibration_views import BandMask, add_view_sums

    band = None
    if not isinstance(target, PredictionMap):
        band = BandMask(target, settings.boundary_band, settings)
    large = pred.n_pixels * pred.num_classes >= FAST_MIN_VALUES
    compiled = _fast.AVAILABLE and accelerate is not False and (large or accelerate is True)

    def add(chunk: Stats, terms, start: int, stop: int, valid) -> None:
        mask = None
        if band is not None:
            mask = band(start, stop)
            mask = mask if valid is None else mask[valid]
        add_view_sums(chunk, terms, mask, settings, compiled=compiled)

    return add


def uses_kernel(pred: PredictionMap, settings: MetricSettings, accelerate: bool | None) -> bool:
    """Whether ``image_stats`` computes this map (against hard labels) with the compiled
    kernel: it must be installed and cover the settings, and ``accelerate`` is True, or
    None and the map has at least FAST_MIN_VALUES values."""
    if accelerate is False:
        return False
    if accelerate is None and pred.n_pixels * pred.num_classes < FAST_MIN_VALUES:
        return False
    from ..core import _fast

    return _fast.supported(settings, pred.compute_dtype)


def _fast_image_stats(
    pred, target, settings, chunk_pixels, target_path, tolerance, *, read_ahead: bool = False
) -> Stats:
    """``image_stats`` through the compiled kernel: each chunk is added to the totals in
    place, ignored pixels masked inside the kernel (no compaction copy). A chunk the
    kernel refuses (bad values, or bad values only under ignored pixels) goes through the
    NumPy path, which raises the error or computes it."""
    from ..core import _fast

    pixel_major = pred.layout == "hwc"
    labels = target.reshape(-1)
    settings.labels.check(labels, target_path)
    chunk_pixels = chunk_for(chunk_pixels, pred.num_classes)
    planes = pred.planes_in_memory()  # read in place when the map is in memory already
    # labels that fit int32 go to the kernel as they are; wider ones (and mapped ones) as codes
    plain = settings.labels.plain and np.can_cast(labels.dtype, np.int32)
    total = Stats.zeros(settings.num_classes, settings.ece_bins)
    read = pred.pixel_rows if pixel_major else pred.block
    n = pred.n_pixels
    ranges = [(a, min(a + chunk_pixels, n)) for a in range(0, n, chunk_pixels)]
    if planes is not None:
        chunks = ((a, b, None) for a, b in ranges)
    elif read_ahead and len(ranges) > 1:
        chunks = _chunks_read_ahead(read, ranges)
    else:
        chunks = _chunks_in_one_buffer(read, ranges)
    for start, stop, P in chunks:
        raw = labels[start:stop]
        # plain labels go in as they are (the kernel masks those outside 0..C-1); else codes
        y = raw if plain else settings.labels.codes(raw)
        if planes is not None:
            if _fast.add_chunk(total, planes, y, settings, tolerance, start=start):
                continue
            P = pred.block(start, stop)
        else:  # read into a buffer that is reused for later chunks
            if _fast.add_chunk(total, P, y, settings, tolerance, pixel_major=pixel_major):
                continue
            # P goes on to the NumPy path (its buffer is read into once this chunk is done)
            if pixel_major:
                P = np.ascontiguousarray(P.T)
        _, P, y = _valid_pixels(P, settings.labels.codes(raw))
        total = total + Stats.from_terms(_terms(pred, P, y, settings, tolerance), settings)
    # KL(p‖q) against one-hot targets is infinite: undefined, unless no pixel was valid
    total.sums[1] = np.nan if total.n_valid else 0.0
    return total


def _chunks_in_one_buffer(read, ranges):
    """``(start, stop, P)`` of each chunk, read into one buffer reused for every chunk (no
    fresh pages to fault in each time): P is valid until the next chunk is asked for."""
    buffer = None
    for start, stop in ranges:
        buffer = read(start, stop, out=buffer)
        yield start, stop, buffer


def _chunks_read_ahead(read, ranges):
    """``_chunks_in_one_buffer`` with one read-ahead thread: the next chunk is read (``pread``
    and NumPy copies release the GIL) into a second buffer while the caller computes this
    one, so one worker's file reads overlap its kernel. P is valid until the next chunk
    is asked for; an error reading a chunk is raised when that chunk is asked for."""
    from concurrent.futures import ThreadPoolExecutor

    buffers: list = [None, None]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="klseg-read") as pool:
        pending = pool.submit(read, *ranges[0], out=None)
        for k, (start, stop) in enumerate(ranges):
            P = buffers[k % 2] = pending.result()
            if k + 1 < len(ranges):  # the buffer of chunk k-1, which the caller is done with
                pending = pool.submit(read, *ranges[k + 1], out=buffers[(k + 1) % 2])
            yield start, stop, P


def _terms(pred: PredictionMap, P, target, settings, tolerance) -> PixelTerms:
    try:
        if settings.temperature != 1.0:  # the calibrated map, as --write would store it
            from ..core.calibration import scaled_chunk

            P, settings = scaled_chunk(
                P, settings, pred.array.dtype, tolerance, two_d=pred.layout == "hw"
            )
            tolerance = None  # checked before scaling
        return pixel_terms(P, target, settings, tolerance=tolerance)
    except KlsegError as err:
        raise err.with_path(pred.path) from None


@dataclass
class OpenedPair:
    pred: PredictionMap
    target: np.ndarray | PredictionMap | None
    height: int
    width: int
    spatial: tuple[int, ...] | None = None  # a volume's shape (volumes.py); None: (H, W)
    spacing: tuple[float, ...] | None = None  # voxel spacing from a NIfTI header


def open_pair(
    pair: Pair, *, soft_gt: bool, num_classes: int | None, read: ReadOptions
) -> OpenedPair:
    """Open a prediction and its target, check that they fit, and find the layout."""
    from ..io.volumes import is_volume_pair

    if is_volume_pair(pair, read):
        from ..io.volumes import open_volume_pair

        return open_volume_pair(pair, soft_gt=soft_gt, num_classes=num_classes, read=read)
    kw = dict(npz_key=read.npz_key, max_pixels=read.max_pixels)
    target: np.ndarray | PredictionMap | None = None
    hw = None
    if pair.target is not None:
        _refuse_swapped(pair, read=read)
        if soft_gt:
            hw = soft_target_hw(pair, num_classes=num_classes, read=read)
            target = open_prediction(
                pair.target, hw=hw, layout=read.layout, num_classes=num_classes, **kw
            )
            if target.layout == "hw":
                raise ShapeError("a soft target must be (H, W, C) or (C, H, W)", path=pair.target)
        else:
            target = read_target(pair.target, max_pixels=read.max_pixels)
            hw = target.shape
    pred = open_prediction(pair.pred, hw=hw, layout=read.layout, num_classes=num_classes, **kw)
    if num_classes is not None and pred.num_classes != num_classes:
        raise ShapeError(
            f"has {pred.num_classes} classes ({pred.layout.upper()} shape "
            f"{tuple(pred.array.shape)}), expected {num_classes} (the classes given or found "
            "first: check --classes)",
            path=pair.pred,
        )
    if isinstance(target, PredictionMap) and target.num_classes != pred.num_classes:
        raise ShapeError(
            f"soft target has {target.num_classes} classes, prediction {pred.num_classes}",
            path=pair.target,
        )
    return OpenedPair(pred, target, pred.height, pred.width)


def _refuse_swapped(pair: Pair, *, read: ReadOptions) -> None:
    """A usage error when PRED holds integer labels and GT floats (arguments swapped).

    Only headers are read (``.npy`` and TIFF are memory-mapped or opened lazily); ``.npz``
    predictions are not looked into, their own errors say enough.
    """
    suffix = pair.pred.suffix.lower()
    if suffix == ".npz" or pair.target.suffix.lower() == ".npz":
        return
    try:
        labels = (
            suffix == ".png"
            or load_array(pair.pred, max_pixels=read.max_pixels).dtype.kind in "iub"
        )
        if labels and load_array(pair.target, max_pixels=read.max_pixels).dtype.kind == "f":
            raise UsageError(
                f"PRED and GT look swapped: {pair.pred} holds integer labels and "
                f"{pair.target} floats; pass the prediction maps first, then the targets"
            )
    except InputError:
        return  # the file's own error is reported when it is opened


def soft_target_hw(
    pair: Pair, *, num_classes: int | None, read: ReadOptions
) -> tuple[int, int] | None:
    """The (H, W) of a soft target, from its shape and the prediction's (either may be HWC
    or CHW): the (H, W) both shapes share; when both ends fit, the class count, and else
    the axis along which the target's values sum to 1."""
    kw = dict(npz_key=read.npz_key, max_pixels=read.max_pixels)
    try:
        t_arr = load_array(pair.target, **kw)
        p_shape = tuple(load_array(pair.pred, **kw).shape)
    except InputError:
        return None  # reported when the file is opened
    t_shape = tuple(t_arr.shape)
    if len(t_shape) != 3 or len(p_shape) not in (2, 3) or read.layout is not None:
        return None
    if len(p_shape) == 2:
        return p_shape if p_shape in (t_shape[:2], t_shape[1:]) else None
    candidates = [hw for hw in (t_shape[:2], t_shape[1:]) if hw in (p_shape[:2], p_shape[1:])]
    if len(set(candidates)) == 1:
        return candidates[0]
    if num_classes is not None:
        fits = [hw for hw, c in ((t_shape[:2], t_shape[2]), (t_shape[1:], t_shape[0]))
                if c == num_classes]  # fmt: skip
        if len(fits) == 1:
            return fits[0]
    sums_last = np.asarray(t_arr[:2, :2, :], dtype=np.float64).sum(axis=-1)
    sums_first = np.asarray(t_arr[:, :2, :2], dtype=np.float64).sum(axis=0)
    last, first = np.allclose(sums_last, 1, atol=1e-2), np.allclose(sums_first, 1, atol=1e-2)
    if last != first:
        return t_shape[:2] if last else t_shape[1:]
    return None  # detect_layout explains the ambiguity


def evaluate_pair(
    pair: Pair, settings: MetricSettings, *, read: ReadOptions = ReadOptions()
) -> ImageResult:
    """Sums and counts of one prediction against its target."""
    from ..io.zarrio import collect_missing, frozen

    use_read_options(read)
    with collect_missing() as missing:  # Zarr chunks read as the fill value
        opened = open_pair(
            pair, soft_gt=settings.soft_gt, num_classes=settings.num_classes, read=read
        )
        if opened.target is None:
            raise UsageError(f"{pair.pred}: evaluation needs a target")
        total = image_stats(
            opened.pred,
            opened.target,
            settings,
            chunk_pixels=read.chunk_pixels,
            target_path=pair.target,
            accelerate=read.accelerate,
            read_ahead=read.read_ahead,
        )
        boundary = None
        if settings.boundary is not None:
            from ..core.boundary import image_boundary

            boundary = image_boundary(opened, settings, chunk_pixels=read.chunk_pixels)
    return ImageResult(
        pair.stem, pair.pred, pair.target, opened.height, opened.width, total,
        shape=getattr(opened, "file_shape", None), boundary=boundary,
        zarr_missing=frozen(missing) or None,
    )  # fmt: skip


def parse_classes(spec: str | None) -> tuple[str, ...]:
    """``--classes road,car,...`` or a file: one name a line, ``ID NAME`` lines (ids 0..C−1,
    each once, any order), or JSON (a list of names, or an object {id: name})."""
    if not spec:
        return ()
    path = Path(spec)
    is_file = exists(path) and not path.is_dir()
    if is_file:  # a FIFO, device, unreadable file: one error
        names = _class_names_file(path, read_small_text(path, what="class-names file"))
    else:
        if spec.endswith((".txt", ".csv", ".json", ".names")) or "/" in spec:
            raise InputError("no such class-names file", path=spec)
        names = tuple(name.strip() for name in spec.split(","))
    where = f"{path}: " if is_file else ""
    if any(not n for n in names):
        raise UsageError(f"{where}--classes has an empty name: {spec!r}")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"{where}--classes names a class twice: {', '.join(twice)}")
    return names


_ID_NAME = re.compile(r"^\s*(\d+)\s*[\s,:;=]\s*(\S.*?)\s*$")


def _class_names_file(path: Path, text: str) -> tuple[str, ...]:
    data, is_json = None, path.suffix.lower() == ".json"
    if is_json or text.lstrip()[:1] in ("[", "{"):  # "[bold]road" lines are names, not JSON
        try:
            data = json.loads(text)
            is_json = True
        except json.JSONDecodeError as err:
            if is_json:
                raise InputError(f"class names: not valid JSON ({err.msg})", path=path) from None
    if is_json:
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            names = tuple(n.strip() for n in data)
        elif isinstance(data, dict):
            try:
                by_id = {int(k): str(v).strip() for k, v in data.items()}
            except ValueError:
                raise InputError(
                    "class names: a JSON object must map class ids to names", path=path
                ) from None
            names = _names_by_id(by_id, path)
        else:
            raise InputError(
                "class names: JSON must be a list of names or an object {id: name}", path=path
            )
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        matches = [_ID_NAME.match(line) for line in lines]
        if lines and all(matches):  # "0 background", "1: road", "2,car"
            names = _names_by_id({int(m.group(1)): m.group(2) for m in matches}, path)
            if len(matches) != len(names):
                raise InputError("class names: an id is listed twice", path=path)
        else:
            names = tuple(lines)
    if not names:
        raise InputError("holds no class names", path=path)
    return names


def _names_by_id(by_id: dict[int, str], path: Path) -> tuple[str, ...]:
    if sorted(by_id) != list(range(len(by_id))):
        raise InputError(
            f"class names: ids must be 0..{len(by_id) - 1}, each once; got "
            f"{', '.join(map(str, sorted(by_id)[:10]))}",
            path=path,
        )
    return tuple(by_id[i] for i in range(len(by_id)))


@dataclass(frozen=True)
class Job:
    """What to read and how to compute: the pairs, the numeric settings, the read options."""

    pairing: Pairing
    settings: MetricSettings
    read: ReadOptions


def plan(
    pred: str | Path,
    target: str | Path | None,
    *,
    classes: Sequence[str] | str | None = None,
    eps: float = DEFAULT_EPS,
    smoothing: float = 0.0,
    ignore_index: Sequence[int] | None = None,
    input_kind: str = "probs",
    log_base: float = math.e,
    soft_gt: bool = False,
    renormalize: bool = False,
    layout: str | None = None,
    pred_suffix: str = "",
    gt_suffix: str = "",
    allow_missing: bool = False,
    npz_key: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    label_map: str | Path | LabelMap | None = None,
    reduce_zero_label: bool = False,
    exclude_class: Sequence[str | int] = (),
    temperature: float = 1.0,
    calibration_views: bool = False,
    boundary_band: int = 3,
    boundary: BoundaryOptions | None = None,
    spatial_dims: int = 2,
    allow_affine_mismatch: bool = False,
    timeout: float | None = None,
    strict_zarr: bool = False,
    uncertainty: Sequence[str] = (),
    qc_threshold: float = 0.5,
) -> Job:
    """Pair the files and settle the settings (the class count comes from the first map).

    ``timeout``: seconds a remote read may go without a byte (``--timeout``; None: the
    environment's ``KLSEG_TIMEOUT``, else 60; see ``io/network.py``). ``strict_zarr``: a
    missing Zarr chunk is an error instead of the fill value."""
    from ..io import network

    check_path_argument(pred, "PRED")
    check_path_argument(target, "GT")
    net = network.settings_for(timeout)
    use_read_options(ReadOptions(network=net, strict_zarr=strict_zarr))  # before any listing
    names, label_map = class_names_and_map(classes, label_map)
    from ..io.remote import as_input

    pairing = pair_files(
        as_input(pred),
        as_input(target),
        pred_suffix=pred_suffix,
        gt_suffix=gt_suffix,
    )
    if pairing.missing_pred and not allow_missing:
        shown = ", ".join(p.name for p in pairing.missing_pred[:5])
        n_missing = len(pairing.missing_pred)
        more = f" and {n_missing - 5} more" if n_missing > 5 else ""
        raise InputError(
            f"{n_missing} targets have no prediction ({shown}{more}); "
            "pass --allow-missing to evaluate the rest",
            path=pred,
        )
    if boundary is not None and soft_gt:
        raise UsageError("--boundary needs label targets (class masks), not --soft-gt maps")
    read = ReadOptions(
        layout=layout, npz_key=npz_key, max_pixels=max_pixels, chunk_pixels=chunk_pixels,
        spatial_dims=spatial_dims, allow_affine_mismatch=allow_affine_mismatch,
        network=net, strict_zarr=strict_zarr,
    )  # fmt: skip
    if calibration_views and pairing.pairs:
        from ..io.volumes import is_volume_pair

        if spatial_dims == 3 or is_volume_pair(pairing.pairs[0], read):
            raise UsageError(
                "--calibration-views works on 2-D images only: its boundary band (pixels near "
                "another class) is not computed in 3-D; leave out the view names"
            )
    num_classes = len(names) if names else None
    if num_classes is None:  # the first prediction that opens tells (--keep-going skips bad ones)
        first_error = None
        for pair in pairing.pairs:
            try:
                opened = open_pair(pair, soft_gt=soft_gt, num_classes=None, read=read)
                num_classes = opened.pred.num_classes
                break
            except InputError as err:
                first_error = first_error or err
        else:
            raise first_error
    settings = metric_settings(
        num_classes, names, label_map, eps=eps, smoothing=smoothing, ignore_index=ignore_index,
        input_kind=input_kind, log_base=log_base, soft_gt=soft_gt, renormalize=renormalize,
        reduce_zero_label=reduce_zero_label, exclude_class=exclude_class,
        temperature=temperature, calibration_views=calibration_views,
        boundary_band=boundary_band, boundary=boundary, option="--exclude-class",
        **({"uncertainty": tuple(uncertainty), "qc_threshold": qc_threshold}
           if uncertainty else {}),
    )  # fmt: skip
    job = Job(pairing, settings, read)
    if input_kind == "logits":
        _warn_if_probabilities(job)
    return job


def check_path_argument(value, what: str) -> None:
    """A usage error, not a bare TypeError, when a function reading files gets an array."""
    import os

    if value is None or isinstance(value, (str, os.PathLike)) or hasattr(value, "is_remote"):
        return
    raise UsageError(
        f"{what} must be a path or URL, got {type(value).__module__}.{type(value).__qualname__};"
        " for arrays use klseg_cli.Evaluator(num_classes).update(pred, target)"
    )


def _warn_if_probabilities(job: Job) -> None:
    """``--input logits`` on a map whose first pixels are valid probabilities: a warning
    (a softmax of probabilities is a much flatter distribution: every number changes)."""
    pair = job.pairing.pairs[0]
    try:
        pred = open_pair(pair, soft_gt=job.settings.soft_gt, num_classes=None, read=job.read).pred
        P = pred.block(0, min(pred.n_pixels, 4096))
    except InputError:
        return  # reported when the pair is evaluated
    sums = P.sum(axis=0, dtype=np.float64)
    tol = sum_tolerance(pred.array.dtype)
    if P.size and P.min() >= 0 and P.max() <= 1 and np.all(np.abs(sums - 1) <= tol):
        warnings.warn(
            f"{pair.pred}: --input logits, but the map holds probabilities (every pixel "
            "checked sums to 1); drop --input logits unless these really are logits",
            KlsegWarning,
            stacklevel=3,
        )


def class_names_and_map(
    classes: Sequence[str] | str | None, label_map: str | Path | LabelMap | None
) -> tuple[tuple[str, ...], LabelMap | None]:
    """(class names, label map) from the options: names from ``--classes`` (a spec or a
    file), else a built-in label map's own names."""
    if isinstance(classes, str) or classes is None:
        names = parse_classes(classes)
    else:
        names = tuple(classes)
    if label_map is not None and not isinstance(label_map, LabelMap):
        label_map = load_label_map(label_map)
    if not names and label_map is not None:
        names = label_map.class_names  # a built-in map knows its classes
    return names, label_map


def metric_settings(
    num_classes: int,
    names: Sequence[str],
    label_map: LabelMap | None,
    *,
    ignore_index: int | Sequence[int] | None = None,
    exclude_class: Sequence[str | int] = (),
    option: str = "exclude_class",
    **fields,
) -> MetricSettings:
    """The MetricSettings of the options shared by ``plan`` and ``api.Evaluator``: ignore
    values as a sorted set (None: ``labels.default_ignore_index``, 255 unless it is a
    class), excluded classes resolved from names or ids; ``fields`` are MetricSettings
    fields as they are (eps, smoothing, input_kind, ...)."""
    if ignore_index is None:
        ignore_index = default_ignore_index(
            int(num_classes), reduce_zero_label=fields.get("reduce_zero_label", False)
        )
    if isinstance(ignore_index, (int, np.integer)):
        ignore_index = (int(ignore_index),)
    return MetricSettings(
        num_classes=int(num_classes),
        class_names=tuple(names),
        label_map=label_map,
        ignore_index=tuple(sorted({int(i) for i in ignore_index})),
        exclude_classes=resolve_classes(exclude_class, names, int(num_classes), option),
        **fields,
    )


def resolve_classes(
    specs: Sequence[str | int], names: Sequence[str], num_classes: int, option: str
) -> tuple[int, ...]:
    """Class ids from names or ids (a name wins over an id that looks like it)."""
    ids = []
    for spec in specs:
        text = str(spec).strip()
        if text in names:
            ids.append(list(names).index(text))
        elif text.lstrip("-").isdigit() and 0 <= int(text) < num_classes:
            ids.append(int(text))
        else:
            known = ", ".join(names) if names else f"ids 0..{num_classes - 1}"
            raise UsageError(f"{option} {text!r} is not a class (classes: {known})")
    return tuple(sorted(set(ids)))


def _evaluate_one(pair: Pair, settings: MetricSettings, read: ReadOptions):
    """One pair in a worker process: its result, or the InputError it raised."""
    try:
        return evaluate_pair(pair, settings, read=read)
    except InputError as err:
        return err


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def idle_core() -> bool:
    """Whether a core beyond the one computing is idle, so that a read-ahead thread runs
    beside the kernel: two or more cores here, and a load average (1 min) under one less.

    Measured on the 2-core development machine: with other work on it (load 4-7) the
    read-ahead thread waited for a core and a map took longer (median 0.97 s against
    0.73 s for 4 Cityscapes maps); the overlap pays only where a core is free."""
    import os

    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        load = 0.0
    return cores > 1 and load < cores - 1


def resolve_jobs(job: Job, jobs: int | None) -> tuple[int, str]:
    """(workers, backend) for ``--jobs`` (None: automatic).

    Automatic: one worker per available core, at most one per image. Threads (the kernel)
    cost nothing to start; worker processes (the NumPy path) cost about half a second
    each, so small maps, done in less, run in this process.
    """
    pairs = job.pairing.pairs
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if len(pairs) < 2 or jobs == 1:
        return 1, "serial"
    backend = parallel_backend(job)
    if jobs is None:
        if backend == "processes" and not _large_maps(job):
            return 1, "serial"
        jobs = available_cores()
    workers = min(jobs, len(pairs))
    return (workers, backend) if workers > 1 else (1, "serial")


def _first_map(job: Job) -> PredictionMap | None:
    """The first prediction, opened (its header only), or None when it cannot be: folders
    hold maps of one kind, so it stands for them; its error is reported with its pair."""
    try:
        return _first_prediction(job)
    except InputError:
        return None


def _large_maps(job: Job) -> bool:
    """Whether the first map is large enough (as the kernel's threshold) to be worth a
    worker process."""
    pred = _first_map(job)
    return pred is not None and pred.n_pixels * pred.num_classes >= FAST_MIN_VALUES


def _first_prediction(job: Job) -> PredictionMap:
    """The first pair's prediction, opened from its header (a volume: its size only)."""
    from ..io.volumes import is_volume_pair

    pair = job.pairing.pairs[0]
    if is_volume_pair(pair, job.read):
        from ..io.volumes import header_map

        return header_map(pair.pred, job.read, job.settings.num_classes)
    return open_prediction(
        pair.pred, hw=None, layout=job.read.layout, num_classes=job.settings.num_classes,
        npz_key=job.read.npz_key, max_pixels=job.read.max_pixels,
    )  # fmt: skip


def parallel_backend(job: Job) -> str:
    """How ``--jobs`` runs images in parallel: ``"threads"`` or ``"processes"``.

    Measured on a 2-core machine with Cityscapes-sized maps. When the compiled kernel
    evaluates the maps, each chunk is one call that releases the GIL (``nogil``), so
    threads over images run on both cores at once, share the loaded kernel and pay no
    start-up: threads. The NumPy path is many short NumPy calls per chunk that queue on the
    GIL (2 threads ran at 0.84-1.0x the speed of one), so it uses processes: each imports
    klseg, keeps its own bounded chunk buffers and returns a Stats of a few arrays, cheap to
    pickle. The first prediction decides (``_first_map``).
    """
    pred = _first_map(job)
    if pred is None:
        return "processes"
    return "threads" if uses_kernel(pred, job.settings, job.read.accelerate) else "processes"


def _results(job: Job, jobs: int | None):
    """(pair, ImageResult or InputError) for every pair, in pair order, for any ``jobs``.

    Parallelism is over images (see ``resolve_jobs``: threads or processes). Results are
    merged in pair order, so any ``jobs`` gives the same numbers.
    """
    pairs = job.pairing.pairs
    workers, backend = resolve_jobs(job, jobs)
    if backend == "serial":
        # one worker: an idle second core (if any) reads the next chunk during the kernel
        read = replace(job.read, read_ahead=idle_core())
        for pair in pairs:
            yield pair, _evaluate_one(pair, job.settings, read)
        return
    if backend == "threads":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="klseg")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    yield from pooled_results(pool, _evaluate_one, pairs, job.settings, job.read)


def pooled_results(pool, fn, pairs, *args):
    """(pair, fn(pair, *args)) from an executor, in pair order; on an error or Ctrl-C the
    work not yet started is cancelled and the pool shut down."""
    with pool:
        futures = [pool.submit(fn, pair, *args) for pair in pairs]
        try:
            for pair, future in zip(pairs, futures):
                yield pair, future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def evaluate(
    pred: str | Path,
    target: str | Path,
    *,
    keep_going: bool = False,
    jobs: int | None = None,
    on_image: Callable[[Pair], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    **options,
) -> EvaluationResult:
    """Evaluate prediction maps against targets: two files or two folders.

    ``options`` are those of ``plan`` (classes, eps, smoothing, ignore_index, input_kind,
    log_base, soft_gt, layout, suffixes, allow_missing, npz_key, max_pixels, chunk_pixels).
    With ``keep_going``, a pair that cannot be read is recorded in ``errors`` and skipped.
    ``jobs``: images evaluated at once (threads with the kernel, else processes); None, the
    default, uses every available core where that pays (``resolve_jobs``). The results are
    identical for any value.

    Example (in a notebook)::

        import klseg_cli
        result = klseg_cli.evaluate("preds/", "labels/", classes="classes.txt")
        result.summary()["dataset"]["miou_pooled"]
    """
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    job = plan(pred, target, **options)
    if on_start is not None:
        on_start(len(job.pairing.pairs))
    images: list[ImageResult] = []
    errors: list[dict] = []
    for pair, outcome in _results(job, jobs):
        if isinstance(outcome, InputError):
            if not keep_going:
                raise outcome
            errors.append({"file": outcome.path or str(pair.pred), "message": outcome.message})
        else:
            images.append(outcome)
        if on_image is not None:
            on_image(pair)
    result = EvaluationResult.of(job, images, errors)
    result.warn_missing_chunks()
    return result
