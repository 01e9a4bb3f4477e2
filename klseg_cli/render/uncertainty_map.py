"""``klseg heatmap --metric uncertainty-error``: where the model is uncertain and where wrong.

Every valid pixel gets one of four colours: certain and correct, certain and wrong,
uncertain and correct, uncertain and wrong (DESIGN §11.4). "Uncertain" means score ≥ t for
the first ``--uncertainty`` score (default entropy), t from ``--threshold`` or else the
image's own UEO threshold (the one that makes "uncertain" overlap "wrong" best).
"""

from __future__ import annotations

import math

import numpy as np

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


def legend(width: int, ignore_rgb, threshold: float, score: str, swatches) -> np.ndarray:
    """The four colours and the ignore colour, with the threshold used."""
    t = "—" if not math.isfinite(threshold) else f"{threshold:.4g}"
    entries = [*COLOURS, ("ignored", tuple(int(v) for v in ignore_rgb))]
    entries.append((f"(uncertain: {score} >= {t})", (255, 255, 255)))
    return swatches(width, entries)
