"""Evaluation against several raters (``klseg evaluate PRED --rater A --rater B ...``).

The raters' frequency map q is the target distribution, computed chunk by chunk from the
raters' masks (io/raters.py), and goes through the soft-target path of every metric
(``pixel_terms`` with ``soft_gt``): KL, CE, JS, Brier, IoU of argmax q, ECE. Pixels that no
rater labels are ignored. Beside those sums each image keeps the multi-rater counts
(core/raters.py: soft Dice, GED, IoU against each rater). The result is an
``EvaluationResult`` whose summary adds those scores (DESIGN §11.2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.chunks import DEFAULT_CHUNK_PIXELS, chunk_for
from ..core.metrics import DEFAULT_EPS, MetricSettings
from ..core.raters import (
    RATER_METRICS,
    RaterEvaluationResult,
    RaterImageResult,
    RaterStats,
)
from ..core.results import ReadOptions
from ..core.stats import Stats
from ..errors import InputError, ShapeError, UsageError
from ..io import network
from ..io.opening import use_read_options
from ..io.raters import RaterMasks, RaterPair, RaterPairing, pair_raters
from ..io.readers import (
    DEFAULT_MAX_PIXELS,
    PredictionMap,
    open_prediction,
    read_target,
    sum_tolerance,
)
from .image import _terms
from .local import (
    check_path_argument,
    class_names_and_map,
    metric_settings,
    pooled_results,
)


@dataclass(frozen=True)
class RaterJob:
    """What a multi-rater evaluation reads and how it computes."""

    pairing: RaterPairing
    settings: MetricSettings
    read: ReadOptions
    n_raters: int
    n_samples: int

    def describe(self) -> dict:
        """summary.json's ``settings.raters``: what changes the numbers."""
        return {
            "count": self.n_raters,
            "samples": self.n_samples or 1,
            "samples_from": "--samples" if self.n_samples else "argmax of PRED",
            "soft_dice_thresholds": [k / 10 for k in range(1, 10)],
            "distance": "1 - mean IoU over the mean classes present in either map",
        }


def plan_raters(
    pred: str | Path,
    raters: Sequence[str | Path],
    *,
    samples: Sequence[str | Path] = (),
    classes: Sequence[str] | str | None = None,
    eps: float = DEFAULT_EPS,
    smoothing: float = 0.0,
    ignore_index: Sequence[int] | None = None,  # None: labels.default_ignore_index
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
    label_map=None,
    reduce_zero_label: bool = False,
    exclude_class: Sequence[str | int] = (),
    temperature: float = 1.0,
    calibration_views: bool = False,
    boundary_band: int = 3,
    boundary=None,
    spatial_dims: int = 2,
    allow_affine_mismatch: bool = False,
    timeout: float | None = None,
    strict_zarr: bool = False,
) -> RaterJob:
    """Pair predictions with the raters' masks and settle the settings (``plan``'s options;
    those that need one label target are refused)."""
    check_path_argument(pred, "PRED")
    for r in raters:
        check_path_argument(r, "--rater")
    seen: dict[str, str | Path] = {}
    for r in raters:
        twin = seen.setdefault(os.path.realpath(r), r)
        if twin is not r:
            raise UsageError(f"--rater {r} is given twice (also as {twin}): one folder a rater")
    if soft_gt:
        raise UsageError("--rater makes the target from the raters' masks; leave out --soft-gt")
    if smoothing:
        raise UsageError("--smoothing applies to one hard label; the raters' map is soft already")
    if boundary is not None:
        raise UsageError("--boundary needs one label target; it does not apply with --rater")
    if spatial_dims != 2:
        raise UsageError("--rater reads 2-D label masks; volumes are not supported with it")
    if calibration_views:
        raise UsageError(
            "--calibration-views needs one label target (its boundary band); leave it out "
            "with --rater"
        )
    names, label_map = class_names_and_map(classes, label_map)
    pairing = pair_raters(
        Path(pred), [Path(r) for r in raters], [Path(s) for s in samples],
        pred_suffix=pred_suffix, gt_suffix=gt_suffix,
    )  # fmt: skip
    if pairing.missing_pred and not allow_missing:
        shown = ", ".join(p.name for p in pairing.missing_pred[:5])
        n = len(pairing.missing_pred)
        more = f" and {n - 5} more" if n > 5 else ""
        raise InputError(
            f"{n} rater masks have no prediction ({shown}{more}); pass --allow-missing to "
            "evaluate the rest",
            path=pred,
        )
    read = ReadOptions(layout=layout, npz_key=npz_key, max_pixels=max_pixels,
                       chunk_pixels=chunk_pixels, network=network.settings_for(timeout),
                       strict_zarr=strict_zarr)  # fmt: skip
    use_read_options(read)
    num_classes = len(names) if names else None
    if num_classes is None:
        first = pairing.pairs[0]
        hw = read_target(first.raters[0], max_pixels=max_pixels).shape
        num_classes = _open(first.pred, hw, None, read).num_classes
    settings = metric_settings(
        num_classes, names, label_map, eps=eps, ignore_index=ignore_index, input_kind=input_kind,
        log_base=log_base, soft_gt=True, renormalize=renormalize,
        reduce_zero_label=reduce_zero_label, exclude_class=exclude_class,
        temperature=temperature, boundary_band=boundary_band, option="--exclude-class",
    )  # fmt: skip
    return RaterJob(pairing, settings, read, len(raters), len(samples))


def _open(path: Path, hw, num_classes: int | None, read: ReadOptions) -> PredictionMap:
    pm = open_prediction(path, hw=hw, layout=read.layout, num_classes=num_classes,
                         npz_key=read.npz_key, max_pixels=read.max_pixels)  # fmt: skip
    if (pm.height, pm.width) != tuple(hw):
        raise ShapeError(
            f"shape {tuple(pm.array.shape)} does not fit the raters' masks {tuple(hw)}",
            path=path,
        )
    if num_classes is not None and pm.num_classes != num_classes:
        raise ShapeError(
            f"has {pm.num_classes} classes ({pm.layout.upper()} shape {tuple(pm.array.shape)}), "
            f"expected {num_classes} (the classes given or found first: check --classes)",
            path=path,
        )
    return pm


def rater_image_stats(
    pred: PredictionMap,
    masks: RaterMasks,
    settings: MetricSettings,
    *,
    samples: Sequence[PredictionMap] = (),
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
) -> tuple[Stats, RaterStats]:
    """The sums of one image against its raters: (Stats against q, RaterStats).

    Chunks of pixels in row-major order, the same chunks as ``image_stats`` walks for a
    ``--soft-gt`` map: with every pixel labelled by some rater, the Stats are those of
    ``--soft-gt`` on the saved frequency map, to the last bit.
    """
    C = settings.num_classes
    tolerance = None if settings.input_kind == "logits" else sum_tolerance(pred.array.dtype)
    logits = settings.input_kind == "logits"
    total = Stats.zeros(C, settings.ece_bins)
    counts = RaterStats.zeros(C, masks.n_raters, len(samples))
    step = chunk_for(chunk_pixels, C)
    for start in range(0, pred.n_pixels, step):
        stop = min(start + step, pred.n_pixels)
        band = masks.band(start, stop)
        P = pred.block(start, stop, logits=logits)
        Q, codes, rater_counts = band.q, band.codes, band.counts
        sample_codes = None
        if samples:
            sample_codes = np.stack([np.argmax(s.block(start, stop), axis=0) for s in samples])
        if band.valid is not None:
            if not band.valid.any():
                continue
            P = P.compress(band.valid, axis=1)
            Q = Q.compress(band.valid, axis=1)
            codes = codes.compress(band.valid, axis=1)
            rater_counts = rater_counts.compress(band.valid, axis=1)
            if sample_codes is not None:
                sample_codes = sample_codes.compress(band.valid, axis=1)
        terms = _terms(pred, P, Q, settings, tolerance)
        total = total + Stats.from_terms(terms, settings)
        counts = counts + RaterStats.from_chunk(
            terms.p, terms.pred, codes, sample_codes, counts=rater_counts
        )
    return total, counts


def evaluate_rater_pair(
    pair: RaterPair, settings: MetricSettings, read: ReadOptions = ReadOptions()
) -> RaterImageResult:
    """One image: its prediction against its raters' masks (and its samples)."""
    masks = RaterMasks(pair.raters, settings.labels, max_pixels=read.max_pixels)
    pred = _open(pair.pred, masks.shape, settings.num_classes, read)
    samples = [_open(s, masks.shape, settings.num_classes, read) for s in pair.samples]
    stats, counts = rater_image_stats(pred, masks, settings, samples=samples,
                                      chunk_pixels=read.chunk_pixels)  # fmt: skip
    return RaterImageResult(
        pair.stem, pair.pred, None, pred.height, pred.width, stats,
        raters=counts, rater_paths=pair.raters,
    )  # fmt: skip


def _evaluate_one(pair: RaterPair, settings: MetricSettings, read: ReadOptions):
    try:
        return evaluate_rater_pair(pair, settings, read)
    except InputError as err:
        return err


def evaluate_raters(
    pred: str | Path,
    raters: Sequence[str | Path],
    *,
    samples: Sequence[str | Path] = (),
    keep_going: bool = False,
    jobs: int | None = None,
    on_image: Callable | None = None,
    on_start: Callable[[int], None] | None = None,
    **options,
) -> RaterEvaluationResult:
    """Evaluate prediction maps against several raters' label masks.

    ``options`` are those of ``engine.local.plan``. ``jobs`` > 1 evaluates images in worker
    processes; the numbers are identical for any value.

    Example (in a notebook)::

        from klseg_cli.engine.raters import evaluate_raters
        result = evaluate_raters("preds/", ["rater_a/", "rater_b/", "rater_c/"])
        result.summary()["dataset"]["ged_image_mean"]
    """
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    job = plan_raters(pred, raters, samples=samples, **options)
    pairs = job.pairing.pairs
    if on_start is not None:
        on_start(len(pairs))
    if jobs is None or jobs == 1 or len(pairs) < 2:
        outcomes = ((p, _evaluate_one(p, job.settings, job.read)) for p in pairs)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(pairs)), mp_context=ctx)
        outcomes = pooled_results(pool, _evaluate_one, pairs, job.settings, job.read)
    images, errors = [], []
    for pair, outcome in outcomes:
        if isinstance(outcome, InputError):
            if not keep_going:
                raise outcome
            errors.append({"file": outcome.path or str(pair.pred), "message": outcome.message})
        else:
            images.append(outcome)
        if on_image is not None:
            on_image(pair)
    return RaterEvaluationResult(
        settings=job.settings,
        images=images,
        missing_predictions=job.pairing.missing_pred,
        unpaired_predictions=job.pairing.missing_target,
        errors=errors,
        read=job.read,
        rater_settings=job.describe(),
    )


def dask_evaluate_raters(
    pred: str | Path,
    raters: Sequence[str | Path],
    *,
    scheduler: str,
    samples: Sequence[str | Path] = (),
    keep_going: bool = False,
    jobs: int | None = None,
    on_image: Callable | None = None,
    on_start: Callable[[int], None] | None = None,
    **options,
) -> RaterEvaluationResult:
    """``evaluate_raters`` on a Dask cluster (``--scheduler``): one task per image, sent with
    absolute paths, results merged in pair order, so the numbers are those of one process.
    ``jobs`` is the cluster's business and is ignored."""
    import os

    from .dask_cluster import _distributed, connect

    job = plan_raters(pred, raters, samples=samples, **options)
    pairs = job.pairing.pairs
    sent = [_absolute_pair(p) for p in pairs]
    client, close = connect(scheduler)
    distributed = _distributed()
    try:
        if on_start is not None:
            on_start(len(pairs))
        futures = [
            client.submit(
                _evaluate_one,
                pair,
                job.settings,
                job.read,
                pure=False,
                key=f"klseg-raters-{i}-{os.getpid()}-{id(job)}",
            )
            for i, pair in enumerate(sent)
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        outcomes: list = [None] * len(pairs)
        try:
            for future in distributed.as_completed(futures):
                i = index[future.key]
                outcomes[i] = future.result()
                if on_image is not None:
                    on_image(pairs[i])
        except BaseException:
            client.cancel(futures)
            raise
    finally:
        close()
    images, errors = [], []
    for pair, remote, outcome in zip(pairs, sent, outcomes):
        if isinstance(outcome, InputError):
            err = _as_given(outcome, pair, remote)
            if not keep_going:
                raise err
            errors.append({"file": err.path or str(pair.pred), "message": err.message})
            continue
        outcome.pred_path, outcome.rater_paths = pair.pred, pair.raters
        images.append(outcome)
    return RaterEvaluationResult(
        settings=job.settings, images=images, missing_predictions=job.pairing.missing_pred,
        unpaired_predictions=job.pairing.missing_target, errors=errors, read=job.read,
        rater_settings=job.describe(),
    )  # fmt: skip


def _absolute_pair(pair: RaterPair) -> RaterPair:
    """The pair with absolute paths (a worker need not share this process's folder)."""
    import os

    def absolute(p: Path) -> Path:
        return Path(os.path.abspath(p))

    return RaterPair(pair.stem, absolute(pair.pred), tuple(map(absolute, pair.raters)),
                     tuple(map(absolute, pair.samples)))  # fmt: skip


def _as_given(err: InputError, pair: RaterPair, sent: RaterPair) -> InputError:
    """A worker's error naming the path as the user gave it."""
    given = {str(a): str(b) for a, b in zip(
        (sent.pred, *sent.raters, *sent.samples), (pair.pred, *pair.raters, *pair.samples)
    )}  # fmt: skip
    message = err.message
    for absolute, as_given in given.items():
        message = message.replace(absolute, as_given)
    return type(err)(message, path=given.get(err.path, err.path))


__all__ = [
    "RATER_METRICS",
    "RaterEvaluationResult",
    "RaterImageResult",
    "dask_evaluate_raters",
    "evaluate_rater_pair",
    "evaluate_raters",
    "plan_raters",
    "rater_image_stats",
]


def _class_codes(raw: np.ndarray) -> np.ndarray:
    """The majority map holds class codes already (−1: no rater labels the pixel)."""
    return raw


def rater_map(pred_map, masks, settings, *, with_pred: bool = False, chunk_pixels: int):
    """The rater-disagreement MetricMap of one image (NaN where no rater labels a pixel);
    with ``with_pred`` (``--panel``) the prediction's argmax and, as the target panel, the
    raters' most frequent label (ties to the lowest class, as argmax q everywhere)."""
    from ..core.raters import class_counts, disagreement
    from .maps import MetricMap, _empty, _put

    H, W = masks.shape
    values = _empty((H, W), np.float32, np.nan)
    pred = _empty((H, W), np.uint16, 0) if with_pred else None
    majority = _empty((H, W), np.int16, -1) if with_pred else None
    step = chunk_for(chunk_pixels, settings.num_classes)
    logits = settings.input_kind == "logits"
    for start in range(0, H * W, step):
        stop = min(start + step, H * W)
        codes = masks.codes(start, stop)
        v, labelled = disagreement(codes, settings.num_classes)
        valid = None if labelled.all() else labelled
        _put(values, start, stop, v[labelled], valid, np.nan)
        if pred is not None:
            _put(pred, start, stop, np.argmax(pred_map.block(start, stop, logits=logits), 0),
                 None, 0)  # fmt: skip
            top = np.argmax(class_counts(codes, settings.num_classes), axis=0)
            _put(majority, start, stop, top[labelled], valid, -1)
    return MetricMap("rater-disagreement", values, pred, majority, "", _class_codes)
