"""One image: read it chunk by chunk, compute the per-pixel terms and add up their sums
(the compiled kernel for large maps, the NumPy path for the rest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..core.chunks import DEFAULT_CHUNK_PIXELS, chunk_for
from ..core.metrics import MetricSettings, PixelTerms, check_probabilities, pixel_terms
from ..core.results import ImageResult, ReadOptions
from ..core.stats import Stats
from ..errors import KlsegError, UsageError
from ..io.opening import open_pair, use_read_options
from ..io.pairing import Pair
from ..io.readers import PredictionMap, sum_tolerance

FAST_MIN_VALUES = 1 << 23
"""Maps with at least this many values (8.4M: a 1024×2048 map has 40M) use the compiled
kernel when it is installed; smaller ones are done before numba would have loaded."""


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
