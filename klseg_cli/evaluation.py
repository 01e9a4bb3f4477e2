"""read → chunk → per-pixel terms → sums → merge → results, for one image and for a folder."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, KlsegError, ShapeError, UsageError
from .metrics import DEFAULT_EPS, MetricSettings, PixelTerms, check_probabilities, pixel_terms
from .pairing import Pair, Pairing, pair_files
from .readers import (
    DEFAULT_MAX_PIXELS,
    PredictionMap,
    check_labels,
    open_prediction,
    read_target,
    sum_tolerance,
    valid_labels,
)
from .stats import (
    IMAGE_COLUMNS,
    Stats,
    class_metrics,
    dataset_metrics,
    pixel_metrics,
)

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
    accelerate: bool | None = None  # the compiled kernel (klseg[fast]): None = for large maps


@dataclass
class ImageResult:
    stem: str
    pred_path: Path
    target_path: Path | None
    height: int
    width: int
    stats: Stats

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
        return row


@dataclass
class EvaluationResult:
    settings: MetricSettings
    images: list[ImageResult]
    missing_predictions: list[Path] = field(default_factory=list)
    unpaired_predictions: list[Path] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    read: ReadOptions = field(default_factory=ReadOptions)

    @property
    def total(self) -> Stats:
        total = Stats.zeros(self.settings.num_classes, self.settings.ece_bins)
        for image in self.images:
            total = total + image.stats
        return total

    def image_rows(self) -> list[dict]:
        return [image.row(self.settings) for image in sorted(self.images, key=lambda i: i.stem)]

    def class_rows(self) -> list[dict]:
        return class_metrics(self.total, self.settings)

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
            "dataset": dataset_metrics(images, total, self.settings),
            "classes": class_metrics(total, self.settings),
            "images": images,
            "requirements": [],
            "missing_predictions": [str(p) for p in self.missing_predictions],
            "errors": list(self.errors),
        }


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
                check_probabilities(Q, Q.sum(axis=0), tolerance=soft_tol)
            except KlsegError as err:
                raise err.with_path(target.path) from None
            yield start, stop, None, pred.block(start, stop, logits=logits), Q
        return
    labels = target.reshape(-1)
    check_labels(labels, settings.num_classes, settings.ignore_index, target_path)
    for start in range(0, n, chunk_pixels):
        stop = min(start + chunk_pixels, n)
        P = pred.block(start, stop, logits=logits)
        valid, P, y = _valid_pixels(P, labels[start:stop], settings.num_classes)
        yield start, stop, valid, P, y


def _valid_pixels(P: np.ndarray, y: np.ndarray, num_classes: int):
    """``(valid, P, y)``: a (C, n) chunk and its labels cut to the non-ignored pixels, and
    the mask that did it (None when every pixel is valid; labels are checked already)."""
    y = y.astype(np.intp)
    mask = valid_labels(y, num_classes)
    if mask.all():
        return None, P, y
    return mask, P[:, mask], y[mask]


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
) -> Stats:
    """The sums of one image: the compiled kernel where it applies, else the NumPy path.

    ``accelerate``: True forces the kernel where it applies, False never uses it, None (the
    default) uses it for maps of at least FAST_MIN_VALUES values. Importing numba and
    loading its compiled code costs about a second, more than small maps take in NumPy.
    """
    tolerance = _tolerance(pred, settings)
    if not isinstance(target, PredictionMap) and uses_kernel(pred, settings, accelerate):
        return _fast_image_stats(pred, target, settings, chunk_pixels, target_path, tolerance)
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
    from . import _fast
    from .calibration_views import BandMask, add_view_sums

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
    from . import _fast

    return _fast.supported(settings, pred.compute_dtype)


def _fast_image_stats(pred, target, settings, chunk_pixels, target_path, tolerance) -> Stats:
    """``image_stats`` through the compiled kernel: each chunk is added to the totals in
    place, ignored pixels masked inside the kernel (no compaction copy). A chunk the
    kernel refuses (bad values, or bad values only under ignored pixels) goes through the
    NumPy path, which raises the error or computes it."""
    from . import _fast

    pixel_major = pred.layout == "hwc"
    labels = target.reshape(-1)
    check_labels(labels, settings.num_classes, settings.ignore_index, target_path)
    chunk_pixels = chunk_for(chunk_pixels, pred.num_classes)
    planes = pred.planes_in_memory()  # read in place when the map is in memory already
    total = Stats.zeros(settings.num_classes, settings.ece_bins)
    for start in range(0, pred.n_pixels, chunk_pixels):
        stop = min(start + chunk_pixels, pred.n_pixels)
        y = labels[start:stop]
        if planes is not None:
            if _fast.add_chunk(total, planes, y, settings, tolerance, start=start):
                continue
            P = pred.block(start, stop)
        else:
            P = pred.pixel_rows(start, stop) if pixel_major else pred.block(start, stop)
            if _fast.add_chunk(total, P, y, settings, tolerance, pixel_major=pixel_major):
                continue
            if pixel_major:
                P = np.ascontiguousarray(P.T)
        _, P, y = _valid_pixels(P, y, settings.num_classes)
        total = total + Stats.from_terms(_terms(pred, P, y, settings, tolerance), settings)
    # KL(p‖q) against one-hot targets is infinite: undefined, unless no pixel was valid
    total.sums[1] = np.nan if total.n_valid else 0.0
    return total


def _terms(pred: PredictionMap, P, target, settings, tolerance) -> PixelTerms:
    try:
        if settings.temperature != 1.0:  # the calibrated map, as --write would store it
            from .calibration import scaled_chunk

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


def open_pair(
    pair: Pair, *, soft_gt: bool, num_classes: int | None, read: ReadOptions
) -> OpenedPair:
    """Open a prediction and its target, check that they fit, and find the layout."""
    kw = dict(npz_key=read.npz_key, max_pixels=read.max_pixels)
    target: np.ndarray | PredictionMap | None = None
    hw = None
    if pair.target is not None:
        if soft_gt:
            target = open_prediction(
                pair.target, hw=None, layout=read.layout, num_classes=num_classes, **kw
            )
            if target.layout == "hw":
                raise ShapeError("a soft target must be (H, W, C) or (C, H, W)", path=pair.target)
            hw = (target.height, target.width)
        else:
            target = read_target(pair.target, max_pixels=read.max_pixels)
            hw = target.shape
    pred = open_prediction(pair.pred, hw=hw, layout=read.layout, num_classes=num_classes, **kw)
    if num_classes is not None and pred.num_classes != num_classes:
        raise ShapeError(
            f"has {pred.num_classes} classes ({pred.layout.upper()} shape "
            f"{tuple(pred.array.shape)}), expected {num_classes}",
            path=pair.pred,
        )
    if isinstance(target, PredictionMap) and target.num_classes != pred.num_classes:
        raise ShapeError(
            f"soft target has {target.num_classes} classes, prediction {pred.num_classes}",
            path=pair.target,
        )
    return OpenedPair(pred, target, pred.height, pred.width)


def evaluate_pair(
    pair: Pair, settings: MetricSettings, *, read: ReadOptions = ReadOptions()
) -> ImageResult:
    """Sums and counts of one prediction against its target."""
    opened = open_pair(pair, soft_gt=settings.soft_gt, num_classes=settings.num_classes, read=read)
    if opened.target is None:
        raise UsageError(f"{pair.pred}: evaluation needs a target")
    total = image_stats(
        opened.pred,
        opened.target,
        settings,
        chunk_pixels=read.chunk_pixels,
        target_path=pair.target,
        accelerate=read.accelerate,
    )
    return ImageResult(pair.stem, pair.pred, pair.target, opened.height, opened.width, total)


def parse_classes(spec: str | None) -> tuple[str, ...]:
    """``--classes road,car,...`` or ``--classes names.txt`` (one name a line)."""
    if not spec:
        return ()
    path = Path(spec)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read class names ({err})", path=path) from None
        names = tuple(line.strip() for line in lines if line.strip())
        if not names:
            raise InputError("holds no class names", path=path)
    else:
        if spec.endswith((".txt", ".csv")) or "/" in spec:
            raise InputError("no such class-names file", path=spec)
        names = tuple(name.strip() for name in spec.split(","))
    if any(not n for n in names):
        raise UsageError(f"--classes has an empty name: {spec!r}")
    if len(set(names)) != len(names):
        raise UsageError(f"--classes names a class twice: {spec!r}")
    return names


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
    ignore_index: Sequence[int] = (255,),
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
    temperature: float = 1.0,
    calibration_views: bool = False,
    boundary_band: int = 3,
) -> Job:
    """Pair the files and settle the settings (the class count comes from the first map)."""
    if isinstance(classes, str) or classes is None:
        names = parse_classes(classes)
    else:
        names = tuple(classes)
    pairing = pair_files(
        Path(pred),
        Path(target) if target is not None else None,
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
    read = ReadOptions(
        layout=layout, npz_key=npz_key, max_pixels=max_pixels, chunk_pixels=chunk_pixels
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
    settings = MetricSettings(
        num_classes=num_classes,
        eps=eps,
        smoothing=smoothing,
        ignore_index=tuple(sorted({int(i) for i in ignore_index})),
        input_kind=input_kind,
        log_base=log_base,
        soft_gt=soft_gt,
        class_names=names,
        renormalize=renormalize,
        temperature=temperature,
        calibration_views=calibration_views,
        boundary_band=boundary_band,
    )
    return Job(pairing, settings, read)


def _evaluate_one(pair: Pair, settings: MetricSettings, read: ReadOptions):
    """One pair in a worker process: its result, or the InputError it raised."""
    try:
        return evaluate_pair(pair, settings, read=read)
    except InputError as err:
        return err


def parallel_backend(job: Job) -> str:
    """How ``--jobs`` runs images in parallel: ``"threads"`` or ``"processes"``.

    Measured on a 2-core machine with Cityscapes-sized maps. When the compiled kernel
    evaluates the maps, each chunk is one call that releases the GIL (``nogil``), so
    threads over images run on both cores at once, share the loaded kernel and pay no
    start-up: threads. The NumPy path is many short NumPy calls per chunk that queue on the
    GIL (2 threads ran at 0.84-1.0x the speed of one), so it uses processes: each imports
    klseg, keeps its own bounded chunk buffers and returns a Stats of a few arrays, cheap to
    pickle. The first prediction decides (folders hold maps of one kind); its header is
    all that is read here.
    """
    try:
        pred = open_prediction(
            job.pairing.pairs[0].pred, hw=None, layout=job.read.layout,
            num_classes=job.settings.num_classes, npz_key=job.read.npz_key,
            max_pixels=job.read.max_pixels,
        )  # fmt: skip
    except InputError:
        return "processes"  # the error is reported when the pair is evaluated
    return "threads" if uses_kernel(pred, job.settings, job.read.accelerate) else "processes"


def _results(job: Job, jobs: int):
    """(pair, ImageResult or InputError) for every pair, in pair order, for any ``jobs``.

    Parallelism is over images (see ``parallel_backend`` for threads or processes).
    Results are merged in pair order, so any ``jobs`` gives the same numbers.
    """
    pairs = job.pairing.pairs
    if jobs <= 1 or len(pairs) < 2:
        for pair in pairs:
            yield pair, _evaluate_one(pair, job.settings, job.read)
        return
    workers = min(jobs, len(pairs))
    if parallel_backend(job) == "threads":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="klseg")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    with pool:
        futures = [pool.submit(_evaluate_one, pair, job.settings, job.read) for pair in pairs]
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
    jobs: int = 1,
    on_image: Callable[[Pair], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    **options,
) -> EvaluationResult:
    """Evaluate prediction maps against targets: two files or two folders.

    ``options`` are those of ``plan`` (classes, eps, smoothing, ignore_index, input_kind,
    log_base, soft_gt, layout, suffixes, allow_missing, npz_key, max_pixels, chunk_pixels).
    With ``keep_going``, a pair that cannot be read is recorded in ``errors`` and skipped.
    ``jobs`` > 1 evaluates images in that many processes; the results are identical.

    Example (in a notebook)::

        import klseg_cli
        result = klseg_cli.evaluate("preds/", "labels/", classes="classes.txt")
        result.summary()["dataset"]["miou_pooled"]
    """
    if jobs < 1:
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
    return EvaluationResult(
        settings=job.settings,
        images=images,
        missing_predictions=job.pairing.missing_pred,
        unpaired_predictions=job.pairing.missing_target,
        errors=errors,
        read=job.read,
    )
