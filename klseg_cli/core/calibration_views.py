"""Calibration views beyond top-label ECE (DESIGN §7): sums per chunk, formulas at the end.

Every view is kept as per-bin sums that merge by ``+`` (fields of ``stats.Stats``), so it
costs constant memory however many pixels are seen, and ratios are taken once at the end:

- ``mce``: the largest |acc_b − conf_b| over the non-empty top-label bins (the ECE bins
  already hold what it needs; always computed).
- ``ece_adaptive``: equal-mass bins. Confidences go into a fine fixed histogram whose bins
  are log-spaced in 1 − confidence (FINE_SUB bins per octave from 2⁻²⁴ up, plus one bin
  for 1 − confidence < 2⁻²⁴, i.e. a float32 confidence of 1), dense where a segmentation
  model's confidences crowd (near 1). Walking the fine bins by increasing confidence, a fine
  bin whose first pixel has rank r (0-based, of N) joins adaptive bin ⌊B·r/N⌋: the B bins
  hold equal pixel counts up to the width of one fine bin.
- ``ece_classwise``: for every class c, the B-bin ECE of the one-vs-rest probability p_c
  against 1[y = c] over all valid pixels (Kull et al. 2019), averaged over the classes
  (ignore values inside 0..C−1 are left out of the mean).
- ``ece_boundary`` / ``ece_interior``: top-label ECE of the valid pixels within K pixels
  (Chebyshev distance, ``--boundary-band K``) of a valid pixel of another target class, and
  of the rest. The band comes from the label image, a few rows at a time.

Other tools' names and bins differ: MONAI's ``CalibrationErrorMetric`` (MONAI#8707) calls
the unweighted mean of the per-bin gaps "ACE" (average calibration error), not an adaptive
ECE; and
torchmetrics' bins are [l, u) plus an extra bin for a confidence of exactly 1.0, where klseg
(and DESIGN §2) use ((b−1)/B, b/B].

The adaptive, class-wise and boundary sums (``--calibration-views``) cost about as much as
a few more passes over the map; without that option they stay zero and their metrics NaN.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .metrics import MetricSettings, PixelTerms, ece_bin_index

if TYPE_CHECKING:  # stats imports this module
    from .stats import Stats

FINE_OCTAVES = 24
"""Octaves of 1 − confidence covered, from 2⁻²⁴ (a float32 confidence just below 1) to 1."""
FINE_SUB = 32
"""Fine bins per octave: a fine bin spans 2.2% of 1 − confidence."""
FINE_BINS = 1 + FINE_OCTAVES * FINE_SUB
"""769 fine bins; bin 0 holds 1 − confidence < 2⁻²⁴, higher bins lower confidences."""

VIEW_METRICS = ("ece_adaptive", "ece_classwise", "ece_boundary", "ece_interior")
"""Metrics that need ``--calibration-views`` (``mce`` is always computed)."""


def class_codes(labels: np.ndarray, settings: MetricSettings) -> np.ndarray:
    """Class ids (0..C−1) of raw target labels, −1 where a pixel counts nowhere: the one
    place where the calibration code turns labels into classes."""
    return settings.labels.codes(labels)  # ignore values, label maps: labels.LabelSpec


def mean_classes(settings: MetricSettings) -> list[int]:
    """The classes a class mean covers (``MetricSettings.mean_classes``)."""
    return list(settings.mean_classes)


def fine_bin_index(confidence: np.ndarray) -> np.ndarray:
    """Fine-histogram bin of each confidence: exponent and top mantissa bits of 1 − conf.

    1 − conf is taken in float64 (exact for float32 confidences) and rounded to float32; its
    bits give the octave and FINE_SUB sub-bins at once, without a logarithm.
    """
    u = (1.0 - confidence.astype(np.float64)).astype(np.float32)
    np.maximum(u, 0.0, out=u)
    bits = u.view(np.int32).astype(np.int64)
    octave = (bits >> 23) - 127 + FINE_OCTAVES  # 0 for [2⁻²⁴, 2⁻²³)
    sub = (bits >> (23 - int(math.log2(FINE_SUB)))) & (FINE_SUB - 1)
    idx = 1 + octave * FINE_SUB + sub
    idx[octave < 0] = 0
    np.clip(idx, 0, FINE_BINS - 1, out=idx)
    return idx


def add_view_sums(
    stats: Stats,
    terms: PixelTerms,
    band: np.ndarray | None,
    settings: MetricSettings,
    *,
    compiled: bool = False,
) -> None:
    """Fill the view sums of ``stats`` (a chunk's, fresh from ``Stats.from_terms``).

    ``band`` masks the chunk's valid pixels that lie in the boundary band (None: unknown,
    e.g. for soft targets; the band sums then stay zero). ``compiled``: the class-wise
    bins (C values a pixel) by a numba loop (``_fast_fit.classwise_sums``) instead of
    NumPy's float64 bin indices and bincounts — the same integers and sums.
    """
    C, bins = settings.num_classes, settings.ece_bins
    conf, y = terms.confidence, terms.label
    correct = y == terms.pred
    k = fine_bin_index(conf)
    stats.fine_count += np.bincount(k, minlength=FINE_BINS)
    stats.fine_conf += np.bincount(k, weights=conf, minlength=FINE_BINS)
    stats.fine_correct += np.bincount(k[correct], minlength=FINE_BINS)
    p = terms.p
    if p is not None and p.shape[1] and compiled:
        from ._fast_fit import classwise_sums

        classwise_sums(p, y, bins, stats.classwise_count, stats.classwise_prob,
                       stats.classwise_hit)  # fmt: skip
    elif p is not None and p.shape[1]:
        b = ece_bin_index(p.reshape(-1), bins).reshape(p.shape)
        b += (np.arange(C) * bins)[:, None]
        stats.classwise_count += np.bincount(b.reshape(-1), minlength=C * bins).reshape(C, bins)
        stats.classwise_prob += np.bincount(
            b.reshape(-1), weights=p.reshape(-1), minlength=C * bins
        ).reshape(C, bins)
        hit = b.reshape(-1).take(y * p.shape[1] + np.arange(p.shape[1]))  # cell of (y_i, p_yi)
        stats.classwise_hit += np.bincount(hit, minlength=C * bins).reshape(C, bins)
    if band is not None and band.any():
        bb = ece_bin_index(conf[band], bins)
        stats.band_count += np.bincount(bb, minlength=bins)
        stats.band_conf += np.bincount(bb, weights=conf[band], minlength=bins)
        stats.band_correct += np.bincount(bb[correct[band]], minlength=bins)


def _window_extreme(a: np.ndarray, k: int, op) -> np.ndarray:
    """max (or min) over the (2k+1)×(2k+1) window around each element (edges: the window
    is cut at the border), by two separable passes of shifted comparisons."""
    out = a.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for s in range(1, k + 1):
            if s >= n:
                break
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            op(out[tuple(lo)], src[tuple(hi)], out=out[tuple(lo)])
            op(out[tuple(hi)], src[tuple(lo)], out=out[tuple(hi)])
    return out


def _band_rows(labels: np.ndarray, r0: int, r1: int, k: int, settings: MetricSettings):
    """Boundary-band mask (flat) of rows [r0, r1) of the label image, from rows r0−k … r1+k.

    A pixel is in the band when a valid pixel (label 0..C−1) of another class lies within
    Chebyshev distance k: then the window maximum and minimum of the valid labels differ.
    """
    H, C = labels.shape[0], settings.num_classes
    a0, a1 = max(0, r0 - k), min(H, r1 + k)
    small = np.int16 if C < 32767 else np.int64
    rows = class_codes(labels[a0:a1], settings).astype(small)
    valid = rows >= 0
    hi = _window_extreme(rows, k, np.maximum)  # −1 (no class) never wins a maximum
    lo = _window_extreme(np.where(valid, rows, small(C)), k, np.minimum)
    return (hi != lo)[r0 - a0 : r1 - a0].reshape(-1)


def boundary_band(
    labels: np.ndarray, start: int, stop: int, k: int, settings: MetricSettings
) -> np.ndarray:
    """Boundary-band mask of flat pixels [start, stop) of the (H, W) label image."""
    W = labels.shape[1]
    r0, r1 = start // W, (stop - 1) // W + 1
    return _band_rows(labels, r0, r1, k, settings)[start - r0 * W : stop - r0 * W]


class BandMask:
    """The boundary band of one label image, served for flat pixel ranges in any order.

    Computed for blocks of about ``block_pixels`` pixels of whole rows (plus k rows of halo
    either side) and kept while the chunks walk through the block: memory is one block.
    """

    def __init__(self, labels: np.ndarray, k: int, settings: MetricSettings,
                 block_pixels: int = 1 << 18) -> None:  # fmt: skip
        self.labels, self.k, self.settings = labels, k, settings
        self.width = labels.shape[1]
        self.block_rows = max(1, block_pixels // max(self.width, 1))
        self._block: tuple[int, int, np.ndarray] | None = None

    def __call__(self, start: int, stop: int) -> np.ndarray:
        W = self.width
        r0, r1 = start // W, (stop - 1) // W + 1
        if self._block is None or r0 < self._block[0] or r1 > self._block[1]:
            b1 = min(self.labels.shape[0], max(r1, r0 + self.block_rows))
            self._block = (r0, b1, _band_rows(self.labels, r0, b1, self.k, self.settings))
        b0, _, mask = self._block
        return mask[start - b0 * W : stop - b0 * W]


# --- formulas from merged sums -----------------------------------------------------------


def ece_from_bins(count, conf, correct) -> float:
    """Σ_b (n_b/N)·|acc_b − conf_b| = Σ_b |Σcorrect_b − Σconf_b| / N; NaN when N = 0."""
    count = np.asarray(count, dtype=np.float64)
    n = count.sum()
    if n == 0:
        return math.nan
    return float(np.abs(np.asarray(correct, np.float64) - conf)[count > 0].sum() / n)


def mce_from_bins(count, conf, correct) -> float:
    """max over the non-empty bins of |acc_b − conf_b|; NaN when every bin is empty."""
    count = np.asarray(count, dtype=np.float64)
    nz = count > 0
    if not nz.any():
        return math.nan
    gap = np.abs(np.asarray(correct, np.float64)[nz] - np.asarray(conf)[nz]) / count[nz]
    return float(gap.max())


def adaptive_bins(stats: Stats, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, Σconf, Σcorrect) of ``bins`` equal-mass bins, merged from the fine histogram."""
    count = stats.fine_count[::-1]  # by increasing confidence
    conf = stats.fine_conf[::-1]
    correct = stats.fine_correct[::-1]
    n = int(count.sum())
    before = np.concatenate(([0], np.cumsum(count)[:-1]))
    j = np.minimum((bins * before) // max(n, 1), bins - 1).astype(np.intp)
    return (
        np.bincount(j, weights=count, minlength=bins).astype(np.int64),
        np.bincount(j, weights=conf, minlength=bins),
        np.bincount(j, weights=correct, minlength=bins).astype(np.int64),
    )


def view_metrics(stats: Stats, settings: MetricSettings) -> dict[str, float]:
    """``mce`` and (with ``calibration_views``) the views of VIEW_METRICS; NaN when undefined."""
    out = {"mce": mce_from_bins(stats.ece_count, stats.ece_conf, stats.ece_correct)}
    out.update(dict.fromkeys(VIEW_METRICS, math.nan))
    if not settings.calibration_views:
        return out
    out["ece_adaptive"] = ece_from_bins(*adaptive_bins(stats, settings.ece_bins))
    per_class = [
        ece_from_bins(stats.classwise_count[c], stats.classwise_prob[c], stats.classwise_hit[c])
        for c in mean_classes(settings)
    ]
    out["ece_classwise"] = float(np.mean(per_class)) if per_class else math.nan
    if not settings.soft_gt:
        out["ece_boundary"] = ece_from_bins(stats.band_count, stats.band_conf, stats.band_correct)
        out["ece_interior"] = ece_from_bins(
            stats.ece_count - stats.band_count,
            stats.ece_conf - stats.band_conf,
            stats.ece_correct - stats.band_correct,
        )
    return out


def view_metrics_batch(totals, settings: MetricSettings) -> dict[str, np.ndarray]:
    """``view_metrics`` of many sets of pixels at once, over a leading batch axis (R, ...).

    ``totals`` maps Stats field names to arrays with a leading batch axis (``ece_*`` (R,
    bins), ``fine_*`` (R, FINE_BINS), ``classwise_*`` (R, C, bins), ``band_*`` (R, bins)),
    e.g. bootstrap resamples of per-image sums. Returns {metric: (R,) array}; tested
    against ``view_metrics`` so the two cannot drift apart.
    """

    def arr(name):
        return np.asarray(totals[name], dtype=np.float64)

    def ece_rows(count, conf, correct):
        n = count.sum(axis=-1)
        gap = np.where(count > 0, np.abs(correct - conf), 0.0).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, gap / np.where(n > 0, n, 1.0), np.nan)

    count, conf, correct = arr("ece_count"), arr("ece_conf"), arr("ece_correct")
    R = count.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = np.where(count > 0, np.abs(correct - conf) / np.where(count > 0, count, 1), -1)
    mce = gaps.max(axis=-1)
    out = {"mce": np.where(mce >= 0, mce, np.nan)}
    for name in VIEW_METRICS:
        out[name] = np.full(R, np.nan)
    if not settings.calibration_views:
        return out
    bins = settings.ece_bins
    fc = arr("fine_count")[:, ::-1]
    fconf, fcorr = arr("fine_conf")[:, ::-1], arr("fine_correct")[:, ::-1]
    n = fc.sum(axis=-1, keepdims=True)
    before = np.cumsum(fc, axis=-1) - fc
    j = np.minimum(np.floor(bins * before / np.where(n > 0, n, 1.0)), bins - 1).astype(np.intp)
    flat = (j + bins * np.arange(R)[:, None]).reshape(-1)

    def gather(v):
        return np.bincount(flat, weights=v.reshape(-1), minlength=R * bins).reshape(R, bins)

    out["ece_adaptive"] = ece_rows(gather(fc), gather(fconf), gather(fcorr))
    keep = mean_classes(settings)
    if keep:
        per_class = ece_rows(arr("classwise_count")[:, keep], arr("classwise_prob")[:, keep],
                             arr("classwise_hit")[:, keep])  # fmt: skip
        out["ece_classwise"] = per_class.mean(axis=-1)
    if not settings.soft_gt:
        bc, bconf, bcorr = arr("band_count"), arr("band_conf"), arr("band_correct")
        out["ece_boundary"] = ece_rows(bc, bconf, bcorr)
        out["ece_interior"] = ece_rows(count - bc, conf - bconf, correct - bcorr)
    return out
