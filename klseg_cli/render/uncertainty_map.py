"""``klseg heatmap --metric uncertainty-error``: where the model is uncertain and where wrong.

Every valid pixel gets one of four colours: certain and correct, certain and wrong,
uncertain and correct, uncertain and wrong (DESIGN §11.4). "Uncertain" means score ≥ t for
the first ``--uncertainty`` score (default entropy), t from ``--threshold`` or else the
image's own UEO threshold (the one that makes "uncertain" overlap "wrong" best).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.uncertainty import chunk_histograms, chunk_scores, failure_detection

METRIC = "uncertainty-error"
COLOURS = (
    ("certain, correct", (235, 235, 235)),
    ("certain, wrong", (215, 48, 39)),
    ("uncertain, correct", (116, 173, 209)),
    ("uncertain, wrong", (253, 174, 97)),
)
"""Category 2·[uncertain] + [wrong] → colour: wrong pixels the model was sure of stand out
in red; the ones it flagged in orange; flagged but correct in blue."""


def lut() -> np.ndarray:
    """A (256, 3) colour table that ``heatmap.colorize`` maps categories 0..3 through (with
    vmin 0 and vmax 3 they land on entries 0, 85, 170 and 255)."""
    table = np.empty((256, 3), np.uint8)
    for k, (_, rgb) in enumerate(COLOURS):
        table[max(0, 85 * k - 42) : 85 * k + 43] = rgb
    return table


def categories(scores: np.ndarray, wrong: np.ndarray, threshold: float) -> np.ndarray:
    """2·[score ≥ threshold] + [wrong] as float32, NaN where the pixel is ignored."""
    cat = 2.0 * (scores >= threshold) + (wrong == 1)
    return np.where(np.isnan(scores), np.nan, cat).astype(np.float32)


def compute(opened, settings, *, chunk_pixels: int, target_path: Path | None, empty, put,
            metric_map, with_pred: bool = False):  # fmt: skip
    """The score map (NaN where ignored), the wrong-pixel map and the image's UEO threshold
    of one pair, as a ``heatmap.MetricMap`` (``empty``, ``put``, ``metric_map``: heatmap's
    helpers, passed in so that this module does not import it)."""
    from ..engine.local import iter_terms

    score = (settings.uncertainty or ("entropy",))[0]
    H, W = opened.height, opened.width
    values = empty((H, W), np.float32, np.nan)
    wrong = empty((H, W), np.uint8, 0)
    pred_map = empty((H, W), np.uint16, 0) if with_pred else None
    hist = None
    for start, stop, valid, terms in iter_terms(
        opened.pred, opened.target, settings, chunk_pixels=chunk_pixels, target_path=target_path
    ):
        s = chunk_scores((score,), p=terms.p, confidence=terms.confidence, pred=terms.pred,
                         entropy=terms.entropy)  # fmt: skip
        w = terms.pred != terms.label
        h, _ = chunk_histograms(s, w)
        hist = h if hist is None else hist + h
        put(values, start, stop, s[0], valid, np.nan)
        put(wrong, start, stop, w.astype(np.uint8), valid, 0)
        if pred_map is not None:
            put(pred_map, start, stop, terms.pred, valid, 0)
    t = failure_detection(hist[0])["ueo_threshold"] if hist is not None else math.nan
    labels = opened.target if isinstance(opened.target, np.ndarray) else None
    return metric_map(METRIC, values, pred_map, labels, score, settings.labels.codes,
                      wrong=wrong, threshold=t)  # fmt: skip


def legend(width: int, ignore_rgb, threshold: float, score: str, swatches) -> np.ndarray:
    """The four colours and the ignore colour, with the threshold used."""
    t = "—" if not math.isfinite(threshold) else f"{threshold:.4g}"
    entries = [*COLOURS, ("ignored", tuple(int(v) for v in ignore_rgb))]
    entries.append((f"(uncertain: {score} >= {t})", (255, 255, 255)))
    return swatches(width, entries)
