"""Two models' predictions of the same pixels: divergences and agreement (DESIGN §8).

The core of ``klseg compare``: per-chunk terms of two class-major (C, n) chunks, their sums
(``PairStats``, merged by ``+`` like ``Stats``) and the final formulas. Per pixel, with
p̃ = max(p, eps) as in DESIGN §2 so that a class one model rules out (p = 0) does not make
the divergence infinite:

    kl_ab     KL(A‖B) = Σ_c a_c (log a_c − log b̃_c)     "how well B explains A"
    kl_ba     KL(B‖A) = Σ_c b_c (log b_c − log ã_c)
    js        JS(A, B) = ½KL(A‖M) + ½KL(B‖M), M = (A+B)/2   symmetric, ≤ log 2, no clipping

0·log 0 = 0; KL is clamped at 0 (clipping and rounding can make it −1e-9). Hard decisions:
the confusion matrix of A's argmax (rows) against B's argmax (columns) gives the argmax
agreement (the pixel accuracy of B against A's argmax) and, per class, the agreement IoU
with A's argmax as the reference. Per-class sums are over the pixels A assigns to the class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .metrics import MetricSettings, PredictionTerms, _js_terms, class_dot, class_sum
from .stats import _nanmean_last, confusion_parts, safe_divide

PAIR_METRICS = ("kl_ab", "kl_ba", "js")
"""Per-pixel quantities between two predictions, summed and reported as means (nats)."""
IMAGE_METRICS = (*PAIR_METRICS, "agreement", "agreement_miou")
"""Per-image (and data-set) agreement metrics, in compare.csv's order."""


@dataclass
class PairTerms:
    """Per-pixel quantities of n pixels predicted by A and by B (nats)."""

    kl_ab: np.ndarray
    kl_ba: np.ndarray
    js: np.ndarray
    pred_a: np.ndarray
    pred_b: np.ndarray
    n_clipped_ab: int  # class probabilities of B clipped at eps where A's are > 0
    n_clipped_ba: int


def pair_terms(ta: PredictionTerms, tb: PredictionTerms, settings: MetricSettings) -> PairTerms:
    """KL both ways, JS and the argmaxes of two predictions of the same (C, n) pixels.

    ``ta``/``tb`` come from ``metrics.prediction_terms`` (validated probabilities, logs that
    are finite at 0, argmax), so probabilities and logits are treated as in ``evaluate``.
    """
    pa, pb = ta.p, tb.p
    La, Lb = ta.logp, tb.logp
    if pa.dtype != pb.dtype:  # e.g. float32 against float64: compute in the wider type
        dtype = np.result_type(pa.dtype, pb.dtype)
        pa, pb, La, Lb = (x.astype(dtype) for x in (pa, pb, La, Lb))
    log_eps = pa.dtype.type(math.log(settings.eps))
    La_t, Lb_t = np.maximum(La, log_eps), np.maximum(Lb, log_eps)
    kl_ab = class_dot(pa, La - Lb_t)
    kl_ba = class_dot(pb, Lb - La_t)
    js = class_sum(_js_terms(pa, La, pb, Lb))
    js *= 0.5
    for x in (kl_ab, kl_ba, js):
        np.maximum(x, 0.0, out=x)
    eps = settings.eps
    return PairTerms(
        kl_ab=kl_ab,
        kl_ba=kl_ba,
        js=js,
        pred_a=ta.pred,
        pred_b=tb.pred,
        n_clipped_ab=int(np.count_nonzero((pb < eps) & (pa > 0))),
        n_clipped_ba=int(np.count_nonzero((pa < eps) & (pb > 0))),
    )


@dataclass
class PairStats:
    """Sums and counts of a set of pixels predicted by A and B. Merge with ``+``."""

    sums: np.ndarray  # (3,) float64: Σ kl_ab, Σ kl_ba, Σ js
    confusion: np.ndarray  # (C, C) int64, rows = A's argmax, columns = B's argmax
    class_sums: np.ndarray  # (3, C) float64: the sums over the pixels A assigns to class c
    n_clipped_ab: int = 0
    n_clipped_ba: int = 0

    @classmethod
    def zeros(cls, num_classes: int) -> PairStats:
        return cls(
            sums=np.zeros(len(PAIR_METRICS)),
            confusion=np.zeros((num_classes, num_classes), dtype=np.int64),
            class_sums=np.zeros((len(PAIR_METRICS), num_classes)),
        )

    @classmethod
    def from_terms(cls, t: PairTerms, num_classes: int) -> PairStats:
        C = num_classes
        values = (t.kl_ab, t.kl_ba, t.js)
        return cls(
            sums=np.array([np.sum(v, dtype=np.float64) for v in values]),
            confusion=np.bincount(t.pred_a * C + t.pred_b, minlength=C * C)
            .reshape(C, C)
            .astype(np.int64),
            class_sums=np.stack([np.bincount(t.pred_a, weights=v, minlength=C) for v in values]),
            n_clipped_ab=t.n_clipped_ab,
            n_clipped_ba=t.n_clipped_ba,
        )

    def __add__(self, other: PairStats) -> PairStats:
        return PairStats(
            sums=self.sums + other.sums,
            confusion=self.confusion + other.confusion,
            class_sums=self.class_sums + other.class_sums,
            n_clipped_ab=self.n_clipped_ab + other.n_clipped_ab,
            n_clipped_ba=self.n_clipped_ba + other.n_clipped_ba,
        )

    @property
    def n_valid(self) -> int:
        return int(self.confusion.sum())


def pair_metrics_batch(totals, settings: MetricSettings) -> dict[str, np.ndarray]:
    """Agreement metrics of many sets of pixels (leading batch axis), as ``pair_metrics``.

    ``totals``: PairStats fields with a leading axis, e.g. bootstrap resamples.
    """
    tp, n_a, n_b = confusion_parts(totals)
    n = n_a.sum(axis=-1)
    scale = math.log(settings.log_base)
    sums = np.asarray(totals["sums"], dtype=np.float64)
    out = {name: safe_divide(sums[..., k], n) / scale for k, name in enumerate(PAIR_METRICS)}
    out["agreement"] = safe_divide(tp.sum(axis=-1), n)
    keep = list(settings.mean_classes)  # as every class mean: --exclude-class, ignore values
    tp, n_a, n_b = tp[..., keep], n_a[..., keep], n_b[..., keep]
    out["agreement_miou"] = _nanmean_last(safe_divide(tp, n_a + n_b - tp))
    return out


def pair_metrics(stats: PairStats, settings: MetricSettings) -> dict[str, float]:
    """Mean KL(A‖B), KL(B‖A), JS, argmax agreement and mean agreement IoU of a pixel set."""
    batch = pair_metrics_batch(
        {"sums": stats.sums[None], "confusion": stats.confusion[None]}, settings
    )
    return {name: float(v[0]) for name, v in batch.items()}


def pair_class_rows(stats: PairStats, settings: MetricSettings) -> list[dict]:
    """Per class (by A's argmax): pixel counts of each model, agreement IoU, mean KL/JS."""
    cm = stats.confusion
    tp = np.diag(cm)
    n_a, n_b = cm.sum(axis=1), cm.sum(axis=0)
    iou = safe_divide(tp, n_a + n_b - tp)
    scale = math.log(settings.log_base)
    means = safe_divide(stats.class_sums, n_a[None]) / scale
    return [
        {
            "class_id": c,
            "class_name": name,
            "n_a": int(n_a[c]),
            "n_b": int(n_b[c]),
            "agreement_iou": float(iou[c]),
            **{m: float(means[k, c]) for k, m in enumerate(PAIR_METRICS)},
        }
        for c, name in enumerate(settings.names)
    ]
