"""Running totals: what a chunk, an image or a worker returns, and the final formulas.

A ``Stats`` holds only sums and counts (float64 sums, int64 counts): per-metric pixel sums,
the confusion matrix, per-target-class KL/CE sums and the ECE bin sums. Two Stats merge by
``+``, in any order and grouping, across chunks, images, processes or machines. Ratios are
taken once, from merged totals, by the ``*_metrics`` functions at the bottom — never
averaged from per-chunk ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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

    @classmethod
    def zeros(cls, num_classes: int, ece_bins: int) -> Stats:
        return cls(
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
        return cls(
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
        return Stats(
            sums=self.sums + other.sums,
            confusion=self.confusion + other.confusion,
            class_kl=self.class_kl + other.class_kl,
            class_ce=self.class_ce + other.class_ce,
            ece_count=self.ece_count + other.ece_count,
            ece_conf=self.ece_conf + other.ece_conf,
            ece_correct=self.ece_correct + other.ece_correct,
            n_clipped=self.n_clipped + other.n_clipped,
        )

    @property
    def n_valid(self) -> int:
        return int(self.confusion.sum())

    def to_dict(self) -> dict:
        """Plain lists and numbers: cheap to serialise and ship between processes."""
        return {
            "sums": self.sums.tolist(),
            "confusion": self.confusion.tolist(),
            "class_kl": self.class_kl.tolist(),
            "class_ce": self.class_ce.tolist(),
            "ece_count": self.ece_count.tolist(),
            "ece_conf": self.ece_conf.tolist(),
            "ece_correct": self.ece_correct.tolist(),
            "n_clipped": self.n_clipped,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        return cls(
            sums=np.asarray(d["sums"], dtype=np.float64),
            confusion=np.asarray(d["confusion"], dtype=np.int64),
            class_kl=np.asarray(d["class_kl"], dtype=np.float64),
            class_ce=np.asarray(d["class_ce"], dtype=np.float64),
            ece_count=np.asarray(d["ece_count"], dtype=np.int64),
            ece_conf=np.asarray(d["ece_conf"], dtype=np.float64),
            ece_correct=np.asarray(d["ece_correct"], dtype=np.int64),
            n_clipped=int(d["n_clipped"]),
        )


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
    return out


def dataset_metric_names() -> list[str]:
    """Every key of summary.json's ``dataset`` object, in its order."""
    names = [f"{m}_{kind}" for m in IMAGE_MEAN_METRICS for kind in ("pooled", "image_mean")]
    return names + [f"{m}_pooled" for m in POOLED_ONLY_METRICS]


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
