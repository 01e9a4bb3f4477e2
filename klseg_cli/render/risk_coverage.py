"""Risk–coverage curves (PNG, drawn with Pillow) from the pooled failure-detection histograms.

Coverage k/N keeps the k most confident pixels; risk is the error rate among them (DESIGN
§11.2). One curve per score, the optimal curve (every correct pixel first) and the random
line (risk = the error rate at every coverage); the legend gives each curve's AURC. Drawn
at twice the size and scaled down, as the reliability diagram is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.uncertainty import failure_detection
from ..io.atomic import atomic_path
from .reliability import AXIS, GRID, TEXT, S, _dashed, _font, _vertical_text

COLOURS = {"entropy": (76, 114, 176), "maxprob": (221, 132, 82), "margin": (85, 168, 104)}
OPTIMAL = (20, 20, 20)
RANDOM = (150, 150, 150)
MAX_POINTS = 1500


def curve(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) at the end of every non-empty bin, most confident first (at most
    MAX_POINTS points, evenly spread over the coverage)."""
    c = np.asarray(hist[0], dtype=np.float64)
    w = np.asarray(hist[1], dtype=np.float64)
    n = c + w
    keep = n > 0
    K, E = np.cumsum(n)[keep], np.cumsum(w)[keep]
    N = K[-1] if K.size else 0.0
    if N == 0:
        return np.zeros(0), np.zeros(0)
    cov, risk = K / N, E / K
    if cov.size > MAX_POINTS:
        idx = np.unique(np.searchsorted(cov, np.linspace(0, 1, MAX_POINTS)).clip(0, cov.size - 1))
        cov, risk = cov[idx], risk[idx]
    return np.r_[0.0, cov], np.r_[risk[0], risk]


def optimal_curve(error_rate: float, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Risk of the optimal ordering: 0 up to coverage 1 − r, then (x − (1 − r))/x."""
    x = np.linspace(0, 1, points)
    with np.errstate(divide="ignore", invalid="ignore"):
        risk = np.where(x > 1 - error_rate, (x - (1 - error_rate)) / np.where(x > 0, x, 1), 0.0)
    return x, risk


def draw_risk_coverage(hists: dict[str, np.ndarray], *, title: str, width: int = 480):
    """The plot of {score: histograms (2, bins)} as a PIL image (RGB)."""
    from PIL import Image, ImageDraw

    W = width * S
    left, right, top = 62 * S, 16 * S, 40 * S
    side_w = W - left - right
    side_h = int(side_w * 0.75)
    legend_h = (len(hists) + 2) * 18 * S + 10 * S
    H = top + side_h + 44 * S + legend_h
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img, "RGBA")
    f_title, f_text, f_small = _font(15 * S), _font(12 * S), _font(11 * S)

    curves = {name: curve(h) for name, h in hists.items()}
    fds = {name: failure_detection(h) for name, h in hists.items()}
    r = next((fd["error_rate"] for fd in fds.values() if math.isfinite(fd["error_rate"])), 0.0)
    peak = max([r, 1e-3] + [float(risk[cov >= 0.05].max(initial=0)) for cov, risk
                            in curves.values()])  # fmt: skip
    y_max = min(1.0, _nice(peak * 1.1))

    def px(x: float) -> float:
        return left + x * side_w

    def py(y: float) -> float:
        return top + (1.0 - min(y, y_max) / y_max) * side_h

    draw.text((left, 10 * S), title, fill=TEXT, font=f_title)
    for t in np.linspace(0, 1, 6):
        draw.line([(px(t), py(0)), (px(t), py(y_max))], fill=GRID, width=S)
        label = f"{t:.1f}"
        tw = draw.textlength(label, font=f_small)
        draw.text((px(t) - tw / 2, py(0) + 4 * S), label, fill=AXIS, font=f_small)
    for t in np.linspace(0, y_max, 6):
        draw.line([(px(0), py(t)), (px(1), py(t))], fill=GRID, width=S)
        label = f"{t:.3g}"
        tw = draw.textlength(label, font=f_small)
        draw.text((left - tw - 6 * S, py(t) - 7 * S), label, fill=AXIS, font=f_small)
    _dashed(draw, (px(0), py(r)), (px(1), py(r)), fill=RANDOM, width=2 * S, dash=8 * S)
    ox, oy = optimal_curve(r)
    draw.line([(px(a), py(b)) for a, b in zip(ox, oy)], fill=OPTIMAL, width=S)
    for k, (name, (cov, risk)) in enumerate(curves.items()):
        colour = COLOURS.get(name, (120, 60, 160 - 30 * k))
        if cov.size > 1:
            draw.line([(px(a), py(b)) for a, b in zip(cov, risk)], fill=colour, width=2 * S)
    draw.rectangle([px(0), py(y_max), px(1), py(0)], outline=AXIS, width=S)
    _vertical_text(img, "risk (error rate of the kept pixels)", (6 * S, py(y_max / 2)), f_text)
    xl = "coverage (fraction of pixels kept, most confident first)"
    draw.text((px(0.5) - draw.textlength(xl, font=f_text) / 2, py(0) + 20 * S), xl,
              fill=TEXT, font=f_text)  # fmt: skip

    ly = py(0) + 44 * S
    rows = [(f"{name}: AURC {_fmt(fd['aurc'])}, E-AURC {_fmt(fd['eaurc'])}, "
             f"AUROC {_fmt(fd['auroc'])}", COLOURS.get(name, (120, 60, 160)), "solid")
            for name, fd in fds.items()]  # fmt: skip
    optimal = next(iter(fds.values()))["aurc_optimal"] if fds else math.nan
    rows.append((f"optimal: AURC {_fmt(optimal)}", OPTIMAL, "thin"))
    rows.append((f"random: AURC {_fmt(r)} (error rate)", RANDOM, "dashed"))
    for k, (label, colour, style) in enumerate(rows):
        y = ly + k * 18 * S + 7 * S
        if style == "dashed":
            _dashed(draw, (px(0), y), (px(0) + 22 * S, y), fill=colour, width=2 * S, dash=4 * S)
        else:
            draw.line([(px(0), y), (px(0) + 22 * S, y)], fill=colour,
                      width=2 * S if style == "solid" else S)  # fmt: skip
        draw.text((px(0) + 30 * S, y - 8 * S), label, fill=TEXT, font=f_small)
    return img.resize((W // S, H // S), Image.LANCZOS)


def _nice(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above v."""
    k = math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10**k >= v:
            return m * 10**k
    return 10 ** (k + 1)


def _fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.4g}"


def risk_coverage_png(hists: dict[str, np.ndarray], title: str = "risk-coverage") -> bytes:
    import io

    buf = io.BytesIO()
    draw_risk_coverage(hists, title=title).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def result_histograms(result) -> dict[str, np.ndarray]:
    """{score: pooled histograms (2, BINS)} of an evaluation run with ``--uncertainty``."""
    total = result.total
    names = result.settings.uncertainty
    if not names or total.unc_hist is None:
        return {}
    return {name: total.unc_hist[s] for s, name in enumerate(names)}


def write_risk_coverage_png(result, path: Path) -> Path:
    """``--risk-coverage FILE.png``: the evaluation's risk–coverage curves, atomically."""
    path = Path(path)
    data = risk_coverage_png(result_histograms(result))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
