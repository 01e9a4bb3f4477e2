"""Reliability diagrams (PNG, drawn with Pillow) and their per-bin sums (CSV).

A reliability diagram shows, per top-label confidence bin ((b−1)/B, b/B], the accuracy of
the pixels in it as a bar, the gap to their mean confidence shaded, the diagonal of perfect
calibration, and under the plot how many pixels each bin holds (log scale: segmentation
puts most pixels in the top bin). ECE and MCE are in the title. It is drawn at twice the
size and scaled down, so lines and text come out smooth without matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.calibration_views import ece_from_bins, mce_from_bins
from ..io.atomic import atomic_path

CSV_COLUMNS = (
    "bin", "lower", "upper", "count", "confidence_sum", "correct_sum",
    "mean_confidence", "accuracy", "gap",
)  # fmt: skip

BAR = (76, 114, 176)
GAP = (214, 39, 40)
GRID = (228, 228, 228)
AXIS = (60, 60, 60)
TEXT = (20, 20, 20)
HIST = (150, 150, 150)
S = 2  # supersampling factor


def bin_rows(count, conf, correct) -> list[dict]:
    """One row per bin: the sums and the means (empty bins: undefined means)."""
    bins = len(count)
    rows = []
    for b in range(bins):
        n = int(count[b])
        mean_conf = float(conf[b]) / n if n else math.nan
        acc = float(correct[b]) / n if n else math.nan
        rows.append({
            "bin": b + 1, "lower": b / bins, "upper": (b + 1) / bins, "count": n,
            "confidence_sum": float(conf[b]), "correct_sum": int(correct[b]),
            "mean_confidence": mean_conf, "accuracy": acc,
            "gap": acc - mean_conf if n else math.nan,
        })  # fmt: skip
    return rows


def reliability_csv(count, conf, correct) -> str:
    from .formats import rows_csv

    return rows_csv(bin_rows(count, conf, correct), CSV_COLUMNS)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def draw_reliability(count, conf, correct, *, title: str, width: int = 420):
    """One reliability diagram as a PIL image (RGB)."""
    from PIL import Image, ImageDraw

    count = np.asarray(count, dtype=np.float64)
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    bins = len(count)
    ece = ece_from_bins(count, conf, correct)
    mce = mce_from_bins(count, conf, correct)

    W = width * S
    left, right, top = 58 * S, 16 * S, 58 * S
    side = W - left - right
    hist_h, gap_h = 46 * S, 30 * S
    H = top + side + gap_h + hist_h + 40 * S
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img, "RGBA")
    f_title, f_text, f_small = _font(15 * S), _font(12 * S), _font(11 * S)

    def px(x: float) -> float:
        return left + x * side

    def py(y: float) -> float:
        return top + (1.0 - y) * side

    draw.text((left, 8 * S), title, fill=TEXT, font=f_title)
    n_total = int(count.sum())
    sub = f"ECE {_fmt(ece)}   MCE {_fmt(mce)}   {n_total:,} px"
    draw.text((left, 30 * S), sub, fill=TEXT, font=f_text)

    for t in np.linspace(0, 1, 6):  # grid and ticks
        draw.line([(px(t), py(0)), (px(t), py(1))], fill=GRID, width=S)
        draw.line([(px(0), py(t)), (px(1), py(t))], fill=GRID, width=S)
        label = f"{t:.1f}"
        tw = draw.textlength(label, font=f_small)
        draw.text((left - tw - 6 * S, py(t) - 7 * S), label, fill=AXIS, font=f_small)
    for b in range(bins):
        n = count[b]
        if n <= 0:
            continue
        x0, x1 = px(b / bins) + S, px((b + 1) / bins) - S
        acc, mc = correct[b] / n, conf[b] / n
        draw.rectangle([x0, py(acc), x1, py(0)], fill=BAR)
        lo, hi = sorted((acc, mc))
        _hatch(img, (x0, py(hi), x1, py(lo)))
    _dashed(draw, (px(0), py(0)), (px(1), py(1)), fill=AXIS, width=S, dash=8 * S)
    draw.rectangle([px(0), py(1), px(1), py(0)], outline=AXIS, width=S)
    _vertical_text(img, "accuracy", (8 * S, py(0.5)), f_text)

    # legend inside the plot, top left
    lx, ly = px(0.03), py(0.97)
    for k, (label, colour) in enumerate((("accuracy", BAR), ("gap to confidence", GAP))):
        y = ly + k * 18 * S
        if k == 0:
            draw.rectangle([lx, y, lx + 12 * S, y + 12 * S], fill=colour)
        else:
            _hatch(img, (lx, y, lx + 12 * S, y + 12 * S))
        draw.text((lx + 18 * S, y - S), label, fill=TEXT, font=f_small)
    y = ly + 2 * 18 * S + 6 * S
    _dashed(draw, (lx, y), (lx + 12 * S, y), fill=AXIS, width=S, dash=3 * S)
    draw.text((lx + 18 * S, y - 7 * S), "perfect calibration", fill=TEXT, font=f_small)

    # pixel counts per bin, log scale
    h0 = py(0) + gap_h
    peak = math.log10(1.0 + count.max()) if count.max() > 0 else 1.0
    for b in range(bins):
        if count[b] <= 0:
            continue
        x0, x1 = px(b / bins) + S, px((b + 1) / bins) - S
        hgt = hist_h * math.log10(1.0 + count[b]) / peak
        draw.rectangle([x0, h0 + hist_h - hgt, x1, h0 + hist_h], fill=HIST)
    draw.line([(px(0), h0 + hist_h), (px(1), h0 + hist_h)], fill=AXIS, width=S)
    if count.max() > 0:  # the scale of the strip: its tallest bar
        peak_label = f"tallest: {int(count.max()):,} px"
        draw.text((px(0) + 4 * S, h0 - 2 * S), peak_label, fill=AXIS, font=f_small)
    for t in np.linspace(0, 1, 6):
        label = f"{t:.1f}"
        tw = draw.textlength(label, font=f_small)
        draw.text((px(t) - tw / 2, py(0) + 4 * S), label, fill=AXIS, font=f_small)
    draw.text((left - 52 * S, h0 + hist_h / 2 - 14 * S), "pixels\n(log)", fill=AXIS,
              font=f_small)  # fmt: skip
    xl = "confidence (top-label)"
    draw.text((px(0.5) - draw.textlength(xl, font=f_text) / 2, h0 + hist_h + 8 * S), xl,
              fill=TEXT, font=f_text)  # fmt: skip
    return img.resize((W // S, H // S), Image.LANCZOS)


def _hatch(img, box) -> None:
    """The gap between accuracy and confidence: a red outline with diagonal red hatching
    over a light red wash, readable over the white background and over a blue bar."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = (round(float(v)) for v in box)
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    patch = Image.new("RGBA", (w + 1, h + 1), (*GAP, 45))
    d = ImageDraw.Draw(patch)
    step = 6 * S
    for off in range(-h, w + step, step):
        d.line([(off, h), (off + h, 0)], fill=(*GAP, 255), width=S)
    d.rectangle([0, 0, w, h], outline=(*GAP, 255), width=S)
    img.paste(patch, (x0, y0), patch)


def _fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.4f}"


def _dashed(draw, a, b, *, fill, width: int, dash: int) -> None:
    (x0, y0), (x1, y1) = a, b
    length = math.hypot(x1 - x0, y1 - y0)
    k = max(1, int(length // dash))
    for i in range(0, k, 2):
        t0, t1 = i / k, min(1.0, (i + 1) / k)
        draw.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0),
                   (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)], fill=fill, width=width)  # fmt: skip


def _vertical_text(img, text: str, centre, font) -> None:
    """Paste ``text`` rotated by 90° with its centre at ``centre``."""
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(img)
    w = int(probe.textlength(text, font=font)) + 4
    h = int(font.size * 1.4) if hasattr(font, "size") else 16
    strip = Image.new("RGB", (w, h), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 0), text, fill=TEXT, font=font)
    strip = strip.rotate(90, expand=True)
    img.paste(strip, (int(centre[0]), int(centre[1] - strip.height / 2)))


def reliability_png(panels: Sequence[tuple[tuple, str]]) -> bytes:
    """One diagram, or several side by side, as PNG bytes: ``panels`` = [((count, conf,
    correct), title), ...]."""
    import io

    from PIL import Image

    images = [draw_reliability(*sums, title=title) for sums, title in panels]
    out = Image.new(
        "RGB", (sum(i.width for i in images), max(i.height for i in images)), (255, 255, 255)
    )
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_reliability_png(path: Path, panels: Sequence[tuple[tuple, str]]) -> Path:
    """Write ``reliability_png(panels)`` to ``path``, atomically."""
    path = Path(path)
    data = reliability_png(panels)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def stats_bins(stats) -> tuple:
    """(count, Σconf, Σcorrect) of the top-label bins of a ``Stats``."""
    return stats.ece_count, stats.ece_conf, stats.ece_correct
