"""Running totals: what a chunk, an image or a worker returns, and the final formulas.

A ``Stats`` holds only sums and counts (float64 sums, int64 counts): per-metric pixel sums,
the confusion matrix, per-target-class KL/CE sums and the ECE bin sums. Two Stats merge by
``+``, in any order and grouping, across chunks, images, processes or machines. Ratios are
taken once, from merged totals, by the ``*_metrics`` functions at the bottom — never
averaged from per-chunk ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from .calibration_views import FINE_BINS, VIEW_METRICS, view_metrics, view_metrics_batch
from .metrics import PIXEL_METRICS, MetricSettings, PixelTerms, ece_bin_index


@dataclass
class Stats:
    """Sums and counts over some set of valid pixels. Merge with ``+``."""

    sums: np.ndarray  # (len(PIXEL_METRICS),) float64, nats
    confusion: np.ndarray  # (C, C) int64, rows = target class, columns = predicted class
    class_kl: np.ndarray  # (C,) float64, Σ kl over pixels whose target class is c
    class_ce: np.ndarray  # (C,) float64
    ece_count: np.ndarray  # (bins,) int64
    ece_conf: np.ndarray  # (bins,) float64, Σ confidence
    ece_correct: np.ndarray  # (bins,) int64
    n_clipped: int = 0
    # Calibration views (``--calibration-views``, DESIGN §7; zero unless computed), all merged
    # by +: a fine histogram of confidences for equal-mass bins (FINE_BINS log-spaced bins
    # of 1 − confidence, see calibration_views.fine_bin_index) ...
    fine_count: np.ndarray | None = None  # (FINE_BINS,) int64
    fine_conf: np.ndarray | None = None  # (FINE_BINS,) float64, Σ confidence
    fine_correct: np.ndarray | None = None  # (FINE_BINS,) int64
    # ... one-vs-rest bins of every class's probability p_c against 1[y = c] ...
    classwise_count: np.ndarray | None = None  # (C, bins) int64
    classwise_prob: np.ndarray | None = None  # (C, bins) float64, Σ p_c
    classwise_hit: np.ndarray | None = None  # (C, bins) int64, Σ 1[y = c]
    # ... and the top-label bins of the pixels in the boundary band (interior = all − band).
    band_count: np.ndarray | None = None  # (bins,) int64
    band_conf: np.ndarray | None = None  # (bins,) float64
    band_correct: np.ndarray | None = None  # (bins,) int64
    # Failure detection (``--uncertainty``, DESIGN §11; None unless computed): per score, the
    # histograms of correct (row 0) and wrong (row 1) pixels over uncertainty.BINS bins,
    # and the sum of the scores.
    unc_hist: np.ndarray | None = None  # (S, 2, BINS) int64
    unc_sum: np.ndarray | None = None  # (S,) float64

    def __post_init__(self) -> None:
        C, bins = self.confusion.shape[0], self.ece_count.shape[0]
        for name, (shape, dtype) in _view_fields(C, bins).items():
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape, dtype=dtype))

    @classmethod
    def zeros(cls, num_classes: int, ece_bins: int, *, n_scores: int = 0) -> Stats:
        unc = {}
        if n_scores:
            from .uncertainty import BINS

            unc = {"unc_hist": np.zeros((n_scores, 2, BINS), np.int64),
                   "unc_sum": np.zeros(n_scores)}  # fmt: skip
        return cls(
            **unc,
            sums=np.zeros(len(PIXEL_METRICS)),
            confusion=np.zeros((num_classes, num_classes), dtype=np.int64),
            class_kl=np.zeros(num_classes),
            class_ce=np.zeros(num_classes),
            ece_count=np.zeros(ece_bins, dtype=np.int64),
            ece_conf=np.zeros(ece_bins),
            ece_correct=np.zeros(ece_bins, dtype=np.int64),
        )

    @classmethod
    def from_terms(cls, terms: PixelTerms, settings: MetricSettings) -> Stats:
        """The totals of one chunk's per-pixel terms."""
        C, bins = settings.num_classes, settings.ece_bins
        y, pred = terms.label, terms.pred
        sums = np.array(
            [
                np.nan if t is None else np.sum(t, dtype=np.float64)
                for t in (
                    terms.kl,
                    terms.kl_reverse,
                    terms.js,
                    terms.ce,
                    terms.entropy,
                    terms.brier,
                )
            ]
        )
        if terms.kl_reverse is None and y.size == 0:
            sums[1] = 0.0  # nothing to be undefined about
        confusion = np.bincount(y * C + pred, minlength=C * C).reshape(C, C)
        b = ece_bin_index(terms.confidence, bins)
        # one pass for both the bin counts and the correct counts: index b + bins·[correct]
        b_correct = np.bincount(b + bins * (y == pred), minlength=2 * bins)
        unc = {}
        if settings.uncertainty:
            from .uncertainty import chunk_histograms, chunk_scores

            scores = chunk_scores(settings.uncertainty, p=terms.p, confidence=terms.confidence,
                                  pred=pred, entropy=terms.entropy)  # fmt: skip
            unc["unc_hist"], unc["unc_sum"] = chunk_histograms(scores, y != pred)
        return cls(
            **unc,
            sums=sums,
            confusion=confusion.astype(np.int64),
            class_kl=np.bincount(y, weights=terms.kl, minlength=C),
            class_ce=np.bincount(y, weights=terms.ce, minlength=C),
            ece_count=(b_correct[:bins] + b_correct[bins:]).astype(np.int64),
            ece_conf=np.bincount(b, weights=terms.confidence, minlength=bins),
            ece_correct=b_correct[bins:].astype(np.int64),
            n_clipped=terms.n_clipped,
        )

    def __add__(self, other: Stats) -> Stats:
        return Stats(**{f.name: _plus(getattr(self, f.name), getattr(other, f.name))
                        for f in fields(self)})  # fmt: skip

    @property
    def n_valid(self) -> int:
        return int(self.confusion.sum())

    def to_dict(self) -> dict:
        """Plain lists and numbers: cheap to serialise and ship between processes."""
        return {
            f.name: getattr(self, f.name).tolist()
            if f.name != "n_clipped" and getattr(self, f.name) is not None
            else getattr(self, f.name)
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        """The inverse of ``to_dict``; view sums missing from an older dict are zeros."""
        out = {"n_clipped": int(d["n_clipped"])}
        for f in fields(cls):
            if f.name != "n_clipped" and d.get(f.name) is not None:
                out[f.name] = np.asarray(d[f.name], dtype=_DTYPES.get(f.name, np.float64))
        return cls(**out)


_DTYPES = {
    name: np.int64
    for name in ("confusion", "ece_count", "ece_correct", "fine_count", "fine_correct",
                 "classwise_count", "classwise_hit", "band_count", "band_correct", "unc_hist")
}  # fmt: skip
"""Count fields (int64); every other array of a Stats holds float64 sums."""


def _plus(a, b):
    """a + b, where a field absent from one side (None: not computed) takes the other's."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


_VIEW_FIELDS = (
    ("fine_count", "fine"), ("fine_conf", "fine"), ("fine_correct", "fine"),
    ("classwise_count", "classwise"), ("classwise_prob", "classwise"),
    ("classwise_hit", "classwise"),
    ("band_count", "bins"), ("band_conf", "bins"), ("band_correct", "bins"),
)  # fmt: skip


def _view_fields(num_classes: int, bins: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of each calibration-view field of a Stats."""
    shapes = {"fine": (FINE_BINS,), "classwise": (num_classes, bins), "bins": (bins,)}
    return {name: (shapes[kind], _DTYPES.get(name, np.float64)) for name, kind in _VIEW_FIELDS}


# --- final formulas: ratios from merged totals -------------------------------------------


def safe_divide(num, den):
    """num / den, NaN where den is 0 (an undefined value, never 0 or 1)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def nanmean(values) -> float:
    """Mean of the defined (non-NaN) values; NaN when none is defined."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _info_scale(settings: MetricSettings) -> float:
    """Divisor that turns nats into the requested log base."""
    return math.log(settings.log_base)


def class_metrics(stats: Stats, settings: MetricSettings) -> list[dict]:
    """Rows of ``per_class.csv``: hard-decision counts and ratios, KL/CE per target class."""
    cm = stats.confusion
    tp = np.diag(cm)
    n_target = cm.sum(axis=1)
    n_pred = cm.sum(axis=0)
    fp = n_pred - tp
    fn = n_target - tp
    iou = safe_divide(tp, tp + fp + fn)
    dice = safe_divide(2 * tp, 2 * tp + fp + fn)
    precision = safe_divide(tp, tp + fp)
    recall = safe_divide(tp, tp + fn)
    scale = _info_scale(settings)
    kl = safe_divide(stats.class_kl, n_target) / scale
    ce = safe_divide(stats.class_ce, n_target) / scale
    return [
        {
            "class_id": c,
            "class_name": name,
            "n_target": int(n_target[c]),
            "n_pred": int(n_pred[c]),
            "tp": int(tp[c]),
            "fp": int(fp[c]),
            "fn": int(fn[c]),
            "iou": float(iou[c]),
            "dice": float(dice[c]),
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "kl": float(kl[c]),
            "ce": float(ce[c]),
        }
        for c, name in enumerate(settings.names)
    ]


def ece(stats: Stats) -> float:
    """Top-label expected calibration error from the bin sums."""
    n = stats.ece_count.sum()
    if n == 0:
        return math.nan
    count = stats.ece_count.astype(np.float64)
    gap = np.abs(stats.ece_correct - stats.ece_conf)  # n_b·|acc_b − conf_b|
    return float(gap[count > 0].sum() / n)


def pixel_metrics(stats: Stats, settings: MetricSettings) -> dict[str, float]:
    """Pixel means (``kl`` … ``brier``), accuracy, ECE and the class means of a set of pixels.

    The class means (mIoU, mDice, mAcc, fwIoU) cover ``settings.mean_classes``.
    """
    n = stats.n_valid
    scale = _info_scale(settings)
    out: dict[str, float] = {}
    for name, total in zip(PIXEL_METRICS, stats.sums):
        value = total / n if n else math.nan
        if name != "brier":
            value /= scale
        out[name] = float(value) if math.isfinite(value) else math.nan
    classes = class_metrics(stats, settings)
    means = [classes[c] for c in settings.mean_classes]
    out["accuracy"] = float(np.trace(stats.confusion) / n) if n else math.nan
    out["miou"] = nanmean([c["iou"] for c in means])
    out["mdice"] = nanmean([c["dice"] for c in means])
    out["ece"] = ece(stats)
    out["macc"] = nanmean([c["recall"] for c in means])
    weights = np.array([c["n_target"] for c in means], dtype=np.float64)
    ious = np.array([c["iou"] for c in means], dtype=np.float64)
    defined = weights > 0  # a class with target pixels always has a defined IoU
    total_w = weights[defined].sum()
    out["fwiou"] = (
        float((weights[defined] * ious[defined]).sum() / total_w) if total_w else math.nan
    )
    return out


def _nanmean_last(values: np.ndarray) -> np.ndarray:
    """``nanmean`` along the last axis, NaN where nothing is defined (no warnings)."""
    defined = ~np.isnan(values)
    return safe_divide(np.where(defined, values, 0.0).sum(axis=-1), defined.sum(axis=-1))


def confusion_parts(totals) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, n_target, n_pred), each (..., C) float64, of batched confusion totals.

    All the batched formulas need of a confusion matrix: its diagonal and margins. They are
    taken from ``totals["confusion"]``, or given directly as ``"tp"``, ``"n_target"`` and
    ``"n_pred"`` (the bootstrap resamples these C-wide sums instead of C² cells).
    """
    if "tp" in totals:
        return tuple(np.asarray(totals[k], np.float64) for k in ("tp", "n_target", "n_pred"))
    cm = np.asarray(totals["confusion"], dtype=np.float64)
    return np.diagonal(cm, axis1=-2, axis2=-1), cm.sum(axis=-1), cm.sum(axis=-2)


def pixel_metrics_batch(totals, settings: MetricSettings) -> dict[str, np.ndarray]:
    """``pixel_metrics`` of many sets of pixels at once: the same formulas over a leading axis.

    ``totals`` maps Stats field names to arrays with a leading batch axis (``sums`` (R, 6),
    ``confusion`` (R, C, C), ``ece_*`` (R, bins)), float or int: e.g. bootstrap resamples
    of the per-image sums. Returns {metric: (R,) array}. Kept next to ``pixel_metrics`` (and
    tested against it) so the two cannot drift apart.
    """
    tp, n_target, n_pred = confusion_parts(totals)
    n = n_target.sum(axis=-1)
    scale = _info_scale(settings)
    sums = np.asarray(totals["sums"], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for k, name in enumerate(PIXEL_METRICS):
        value = safe_divide(sums[..., k], n)
        if name != "brier":
            value = value / scale
        out[name] = np.where(np.isfinite(value), value, np.nan)
    out["accuracy"] = safe_divide(tp.sum(axis=-1), n)
    keep = list(settings.mean_classes)  # the classes the class means cover
    tp_m, nt_m, np_m = tp[..., keep], n_target[..., keep], n_pred[..., keep]
    iou = safe_divide(tp_m, nt_m + np_m - tp_m)
    out["miou"] = _nanmean_last(iou)
    out["mdice"] = _nanmean_last(safe_divide(2 * tp_m, nt_m + np_m))
    count = np.asarray(totals["ece_count"], dtype=np.float64)
    gap = np.abs(np.asarray(totals["ece_correct"], np.float64) - totals["ece_conf"])
    out["ece"] = safe_divide(np.where(count > 0, gap, 0.0).sum(axis=-1), count.sum(axis=-1))
    out["macc"] = _nanmean_last(safe_divide(tp_m, nt_m))
    weights = np.asarray(nt_m, dtype=np.float64)
    out["fwiou"] = safe_divide(np.where(weights > 0, weights * iou, 0.0).sum(axis=-1),
                               weights.sum(axis=-1))  # fmt: skip
    out.update(view_metrics_batch(totals, settings))
    if settings.uncertainty:  # --uncertainty: AUROC ... of each resample (uncertainty.py)
        from .uncertainty import pooled_batch

        out.update(pooled_batch(totals, settings))
    return out


IMAGE_COLUMNS = (
    "image", "height", "width", "n_valid",
    "kl", "kl_reverse", "js", "ce", "entropy", "brier", "accuracy", "miou", "mdice", "ece",
)  # fmt: skip
CLASS_COLUMNS = (
    "class_id", "class_name", "n_target", "n_pred", "tp", "fp", "fn",
    "iou", "dice", "precision", "recall", "kl", "ce",
)  # fmt: skip
IMAGE_MEAN_METRICS = IMAGE_COLUMNS[4:]
POOLED_ONLY_METRICS = ("macc", "fwiou")
"""Class means reported over the pooled confusion matrix only (mmsegmentation's mAcc, the
FCN paper's frequency-weighted IoU)."""
IMAGE_CLASS_COLUMNS = (
    "image", "class_id", "class_name", "n_target", "n_pred", "tp", "fp", "fn",
    "iou", "dice", "kl", "ce",
)  # fmt: skip
CALIBRATION_METRICS = ("mce", *VIEW_METRICS)
"""Calibration metrics reported pooled only (``mce_pooled``, ``ece_adaptive_pooled``...)."""


def dataset_metrics(image_rows: list[dict], total: Stats, settings: MetricSettings) -> dict:
    """The ``dataset`` object of summary.json: every metric pooled and as an image mean.

    ``*_pooled`` weighs every valid pixel equally (IoU from the summed confusion matrix);
    ``*_image_mean`` is the mean of the per-image values, skipping undefined ones.
    """
    pooled = pixel_metrics(total, settings)
    out: dict[str, float] = {}
    for name in IMAGE_MEAN_METRICS:
        out[f"{name}_pooled"] = pooled[name]
        out[f"{name}_image_mean"] = nanmean([row[name] for row in image_rows])
    for name in POOLED_ONLY_METRICS:
        out[f"{name}_pooled"] = pooled[name]
    for name, value in view_metrics(total, settings).items():
        out[f"{name}_pooled"] = value
    if settings.uncertainty:  # --uncertainty (uncertainty.py)
        from .uncertainty import dataset_values

        out.update(dataset_values(image_rows, total, settings))
    return out


def dataset_metric_names() -> list[str]:
    """Every key of summary.json's ``dataset`` object, in its order."""
    names = [f"{m}_{kind}" for m in IMAGE_MEAN_METRICS for kind in ("pooled", "image_mean")]
    names += [f"{m}_pooled" for m in (*POOLED_ONLY_METRICS, *CALIBRATION_METRICS)]
    from .boundary import dataset_names  # with --boundary only (boundary.py)
    from .uncertainty import SCORES
    from .uncertainty import dataset_names as uncertainty_names  # with --uncertainty only

    return names + dataset_names() + uncertainty_names(SCORES)


def class_means_cover(settings: MetricSettings) -> dict:
    """What summary.json says about the classes that each mean covers."""
    names = settings.names
    left_out = {names[c]: "ignore value" for c in settings.labels.ignored_classes}
    left_out.update({names[c]: "--exclude-class" for c in settings.exclude_classes})
    return {
        "metrics": ["miou", "mdice", "macc", "fwiou"],
        "classes": [names[c] for c in settings.mean_classes],
        "left_out": left_out,
        "note": "pixel means (kl, ce, js, entropy, brier, accuracy, ece) cover every valid "
        "pixel; classes absent from both target and prediction are left out of a mean",
    }


def image_class_rows(stem: str, stats: Stats, settings: MetricSettings) -> list[dict]:
    """One image's rows of ``per_image_class.csv``: counts, IoU, Dice, KL, CE per class."""
    return [
        {"image": stem, **{k: row[k] for k in IMAGE_CLASS_COLUMNS[1:]}}
        for row in class_metrics(stats, settings)
    ]
