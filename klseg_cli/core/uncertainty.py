"""Failure detection from uncertainty scores (DESIGN §11, docs/design/uncertainty.md).

Per chunk: a score per valid pixel (``maxprob`` = 1 − max p, ``entropy``, ``margin`` =
1 − (p₁ − p₂)), binned on a fixed log-spaced grid of BINS bins, into two int64 histograms
per score — correct and wrong pixels — plus the float64 sum of the scores. These are fields
of ``stats.Stats`` and merge by ``+`` across chunks, images, workers and Dask tasks.
At the end, from merged histograms: AUROC (ties half), AURC (ties spread evenly), E-AURC,
the uncertainty–error overlap (UEO) with its threshold, and for each a bound on how far the
binned value can be from the exact one computed on the raw scores (§11.2.1). Image level:
Spearman correlation and AUROC over images (small arrays, exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCORES = ("maxprob", "entropy", "margin")
"""Uncertainty scores, in the order of their codes (the compiled kernel's numbering)."""
DEFAULT_SCORE = "entropy"

SUB_BITS = 10
"""Bins per octave: 2¹⁰, a bin 0.1% of its score wide."""
OCTAVE_MIN = -60
"""The lowest octave [2⁻⁶⁰, 2⁻⁵⁹). Bin 0 holds the scores that are exactly 0 (a saturated
softmax: exact ties, so they add nothing to the bounds); positive scores below 2⁻⁶⁰·(1 +
2⁻¹⁰) share bin 1."""
OCTAVES = 64
BINS = OCTAVES << SUB_BITS
"""65,536 bins over [2⁻⁶⁰, 16): above log C for any C < 8.8·10⁶."""
_SHIFT = 23 - SUB_BITS
_OFFSET = (127 + OCTAVE_MIN) << SUB_BITS

COARSE_BITS = 4
"""Bins per octave of the bootstrap's coarse grid (2⁴: a bin 4.4% wide, 1,024 bins)."""


def check_scores(names: Sequence[str]) -> tuple[str, ...]:
    """The scores named, each once, in the order given; a ValueError names an unknown one."""
    out: list[str] = []
    for name in names:
        name = str(name).strip().lower()
        if name not in SCORES:
            raise ValueError(f"unknown uncertainty score {name!r}; choose from {', '.join(SCORES)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def bin_index(u: np.ndarray) -> np.ndarray:
    """Bin of each score (float32; negatives from rounding count as 0): octave and top
    SUB_BITS mantissa bits from the float's bits, monotone in the score; bin 0 is exactly 0."""
    u = np.asarray(u, dtype=np.float32)
    u = np.maximum(u, np.float32(0.0))  # also turns −0.0 into +0.0
    idx = (u.view(np.int32) >> _SHIFT).astype(np.int64) - _OFFSET
    np.clip(idx, 1, BINS - 1, out=idx)
    idx[u == 0] = 0
    return idx


def bin_edges(bits: int = SUB_BITS) -> np.ndarray:
    """Lower edge of every bin of a grid with 2^bits bins per octave (bin 0: 0)."""
    k = np.arange(OCTAVES << bits)
    edges = np.ldexp(1.0 + (k & ((1 << bits) - 1)) / (1 << bits), (k >> bits) + OCTAVE_MIN)
    edges[0] = 0.0
    return edges


def chunk_scores(names: Sequence[str], *, p, confidence, pred, entropy) -> np.ndarray:
    """(S, n) float32 scores of a chunk: ``p`` (C, n) probabilities, ``confidence`` and
    ``pred`` its max and argmax, ``entropy`` its entropy in nats."""
    n = confidence.shape[0]
    out = np.empty((len(names), n), dtype=np.float32)
    for s, name in enumerate(names):
        if name == "maxprob":
            out[s] = 1.0 - confidence
        elif name == "entropy":
            out[s] = entropy
        else:  # margin: the largest value once the argmax is set aside
            work = np.array(p, dtype=p.dtype, order="C")  # a copy, flat view below
            work.reshape(-1)[pred * n + np.arange(n)] = -1.0
            second = work.max(axis=0) if p.shape[0] > 1 else np.zeros(n, p.dtype)
            out[s] = 1.0 - (confidence - np.maximum(second, 0.0))
    return out


def chunk_histograms(scores: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hist (S, 2, BINS) int64 — row 0 correct, row 1 wrong —, Σscore (S,) float64)."""
    S = scores.shape[0]
    hist = np.zeros((S, 2, BINS), dtype=np.int64)
    offset = np.where(wrong, BINS, 0)
    for s in range(S):
        hist[s] = np.bincount(bin_index(scores[s]) + offset, minlength=2 * BINS).reshape(2, BINS)
    sums = np.array([np.sum(scores[s], dtype=np.float64) for s in range(S)])
    return hist, sums


def coarsen(hist: np.ndarray, bits: int = COARSE_BITS) -> np.ndarray:
    """Histograms (..., BINS) merged into 2^bits bins per octave (..., OCTAVES·2^bits)."""
    k = 1 << (SUB_BITS - bits)
    return hist.reshape((*hist.shape[:-1], hist.shape[-1] // k, k)).sum(axis=-1)


# --- formulas from merged histograms ------------------------------------------------------


def _digamma(x: np.ndarray) -> np.ndarray:
    """ψ(x) for x ≥ 1 (float64): shifted up to x ≥ 16, then the asymptotic series
    (error below 1e-15 there)."""
    x = np.asarray(x, dtype=np.float64).copy()
    acc = np.zeros_like(x)
    for _ in range(16):
        low = x < 16
        if not low.any():
            break
        acc -= np.where(low, 1.0 / x, 0.0)
        x = np.where(low, x + 1, x)
    inv2 = 1.0 / (x * x)
    series = inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (1 / 240))))
    return acc + np.log(x) - 0.5 / x - series


def harmonic_gap(start, count) -> np.ndarray:
    """H_{start+count} − H_start = Σ_{j=1..count} 1/(start + j), for integers ≥ 0."""
    start = np.asarray(start, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    return _digamma(start + count + 1) - _digamma(start + 1)


def failure_detection(hist: np.ndarray, edges: np.ndarray | None = None) -> dict[str, float]:
    """AUROC, AURC, E-AURC and UEO (with threshold) of one score's histograms (2, bins),
    and a bound on each one's distance from the exact value on the raw scores.

    Bins are ordered by increasing score; a bin is a group of tied scores (DESIGN §11.2).
    """
    c = np.asarray(hist[0], dtype=np.float64)
    w = np.asarray(hist[1], dtype=np.float64)
    n = c + w
    Nc, Nw = float(c.sum()), float(w.sum())
    N = Nc + Nw
    out = dict.fromkeys(
        ("auroc", "aurc", "eaurc", "aurc_optimal", "ueo", "ueo_threshold", "auroc_bound",
         "aurc_bound", "ueo_bound", "error_rate"), math.nan,
    )  # fmt: skip
    if N == 0:
        return out
    out["error_rate"] = Nw / N
    if Nc > 0 and Nw > 0:
        c_below = np.cumsum(c) - c
        out["auroc"] = float(np.sum(w * (c_below + 0.5 * c)) / (Nc * Nw))
        out["auroc_bound"] = float(0.5 * np.sum(c[1:] * w[1:]) / (Nc * Nw))  # bin 0: exact
    # risk–coverage: bin b holds pixels K_b + 1 … K_b + n_b, errors E_b before it;
    # Σ_j (E + j·w/n)/(K + j) = w + (E − K·w/n)·(H_{K+n} − H_K)
    nz = n > 0
    K = (np.cumsum(n) - n)[nz]
    E = (np.cumsum(w) - w)[nz]
    cn, wn, nn = c[nz], w[nz], n[nz]
    gap = harmonic_gap(K, nn)
    aurc = float(np.sum(wn + (E - K * wn / nn) * gap) / N)
    optimal = float((Nw - Nc * harmonic_gap(Nc, Nw)) / N)
    out["aurc"], out["aurc_optimal"], out["eaurc"] = aurc, optimal, aurc - optimal
    d = cn * wn / nn
    if nz[0]:
        d[0] = 0.0  # bin 0 (exact zeros): the interpolation is the tie rule itself
    out["aurc_bound"] = float(np.sum(d * gap) / N)
    # UEO: uncertain = bins ≥ b; Dice = 2·A_b / (U_b + N_w)
    A = np.cumsum(w[::-1])[::-1]  # wrong pixels in bins ≥ b
    U = np.cumsum(n[::-1])[::-1]
    if Nw == 0:
        out["ueo"], out["ueo_bound"] = 0.0, 0.0
        return out
    dice = np.where(nz, 2 * A / (U + Nw), -1.0)
    b = int(np.argmax(dice))
    out["ueo"] = float(dice[b])
    if edges is None:
        edges = bin_edges(SUB_BITS if hist.shape[-1] == BINS else COARSE_BITS)
    out["ueo_threshold"] = float(edges[b])
    A_above, U_above = A - w, U - n  # the bins above b
    best = np.where(nz, 2 * (A_above + w) / (U_above + w + Nw), -1.0)
    best[0] = -1.0  # no threshold splits the exact zeros
    out["ueo_bound"] = float(max(best.max(), out["ueo"]) - out["ueo"])
    return out


PIXEL_NAMES = ("auroc", "aurc", "eaurc", "ueo")
"""Pixel-level quantities of a score, in summary.json as ``<name>_<score>_pooled`` and in
per_image.csv as ``<name>_<score>``."""


def image_values(hist: np.ndarray | None, sums: np.ndarray | None, n_valid: int,
                 names: Sequence[str]) -> dict[str, float]:  # fmt: skip
    """per_image.csv columns of one image: ``uncertainty_<score>`` (mean score) and the
    pixel-level quantities of each score."""
    out: dict[str, float] = {}
    for s, name in enumerate(names):
        out[f"uncertainty_{name}"] = (
            float(sums[s] / n_valid) if sums is not None and n_valid else math.nan
        )
        fd = failure_detection(hist[s]) if hist is not None else {}
        for q in PIXEL_NAMES:
            out[f"{q}_{name}"] = fd.get(q, math.nan)
    return out


# --- image level ---------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 … end
    ranks = np.empty(x.size)
    ranks[order] = avg[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation over the pairs where both are defined; NaN with fewer
    than 2 pairs or a constant variable."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / den) if den > 0 else math.nan


def auroc_exact(scores, positive) -> float:
    """AUROC of ``scores`` for the ``positive`` items, ties counted half (Mann–Whitney);
    NaN without both classes. Items with an undefined score are left out."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    keep = np.isfinite(scores)
    scores, positive = scores[keep], positive[keep]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


DEFAULT_QC_THRESHOLD = 0.5


def image_level(rows: Sequence[dict], names: Sequence[str], qc_threshold: float) -> dict:
    """``spearman_<score>`` (mean score against 1 − mIoU) and ``qc_auroc_<score>`` (mean
    score detecting images with mIoU < qc_threshold), from per_image rows."""
    miou = np.array([_num(r.get("miou")) for r in rows], dtype=np.float64)
    out: dict[str, float] = {}
    for name in names:
        u = np.array([_num(r.get(f"uncertainty_{name}")) for r in rows], dtype=np.float64)
        out[f"spearman_{name}"] = spearman(u, 1.0 - miou)
        keep = np.isfinite(miou)
        out[f"qc_auroc_{name}"] = auroc_exact(u[keep], miou[keep] < qc_threshold)
    return out


def _num(v) -> float:
    return math.nan if v is None else float(v)


def dataset_names(names: Sequence[str]) -> list[str]:
    """summary.json ``dataset`` keys of the scores ``names``, in order."""
    out = [f"{q}_{s}_{kind}" for s in names for q in PIXEL_NAMES
           for kind in ("pooled", "image_mean")]  # fmt: skip
    out += [f"{k}_{s}" for s in names for k in ("spearman", "qc_auroc")]
    return out


def qc_rows(rows: Sequence[dict], names: Sequence[str], qc_threshold: float) -> list[dict]:
    """Rows of qc.csv: images by decreasing mean first score (ties by stem)."""
    if not names:
        return []
    key = f"uncertainty_{names[0]}"

    def order(r):
        u = _num(r.get(key))
        return (0 if math.isfinite(u) else 1, -u if math.isfinite(u) else 0.0, r["image"])

    out = []
    for k, r in enumerate(sorted(rows, key=order), start=1):
        miou = _num(r.get("miou"))
        row = {"rank": k, "image": r["image"]}
        row.update({f"uncertainty_{s}": r.get(f"uncertainty_{s}") for s in names})
        row["miou"] = miou
        row["error"] = 1.0 - miou
        row["accuracy"] = r.get("accuracy")
        row["below_threshold"] = bool(miou < qc_threshold) if math.isfinite(miou) else None
        out.append(row)
    return out


def image_columns(names: Sequence[str] = SCORES) -> tuple[str, ...]:
    """per_image.csv columns of the scores ``names``, in order."""
    return tuple(
        col for s in names for col in (f"uncertainty_{s}", *(f"{q}_{s}" for q in PIXEL_NAMES))
    )


def stats_image_values(stats, settings) -> dict[str, float]:
    """One image's uncertainty columns from its Stats (empty without ``--uncertainty``)."""
    if not settings.uncertainty:
        return {}
    return image_values(stats.unc_hist, stats.unc_sum, stats.n_valid, settings.uncertainty)


def dataset_values(image_rows: Sequence[dict], total, settings) -> dict[str, float]:
    """summary.json ``dataset`` entries of ``--uncertainty`` (empty without it): pooled and
    image-mean pixel-level values, and the image-level Spearman and QC AUROC."""
    names = settings.uncertainty
    if not names:
        return {}
    out: dict[str, float] = {}
    for s, name in enumerate(names):
        fd = failure_detection(total.unc_hist[s]) if total.unc_hist is not None else {}
        for q in PIXEL_NAMES:
            out[f"{q}_{name}_pooled"] = fd.get(q, math.nan)
            values = np.array([_num(r.get(f"{q}_{name}")) for r in image_rows], np.float64)
            values = values[np.isfinite(values)]
            out[f"{q}_{name}_image_mean"] = float(values.mean()) if values.size else math.nan
    image = image_level(image_rows, names, settings.qc_threshold) if image_rows else {}
    for name in names:
        for k in ("spearman", "qc_auroc"):
            out[f"{k}_{name}"] = image.get(f"{k}_{name}", math.nan)
    return out


def summary_section(total, settings) -> dict:
    """summary.json's ``uncertainty`` object: per score the error rate, the optimal AURC,
    the UEO threshold and the bounds of §11.2.1; the grid and the QC threshold."""
    scores = {}
    for s, name in enumerate(settings.uncertainty):
        fd = failure_detection(total.unc_hist[s]) if total.unc_hist is not None else {}
        scores[name] = {k: fd.get(k, math.nan) for k in (
            "error_rate", "aurc_optimal", "ueo_threshold", "auroc_bound", "aurc_bound",
            "ueo_bound")}  # fmt: skip
    return {
        "scores": scores,
        "grid": {"bins": BINS, "bins_per_octave": 1 << SUB_BITS, "lowest": 2.0**OCTAVE_MIN},
        "qc_threshold": settings.qc_threshold,
        "image_error": "1 - miou",
    }


# --- bootstrap: the same quantities for many resamples ------------------------------------

IMAGE_LEVEL = ("spearman", "qc_auroc")


def pooled_batch(totals, settings) -> dict[str, np.ndarray]:
    """``<q>_<score>`` (q in PIXEL_NAMES) of R resamples, from their totals of the coarse
    per-image histograms ``unc_coarse`` (R, S, 2, OCTAVES·2^COARSE_BITS) — the bootstrap's
    grid, see DESIGN §11.2.1 — or of the fine ``unc_hist``; {} without ``--uncertainty``."""
    names = settings.uncertainty
    if not names:
        return {}
    if "unc_coarse" in totals:
        hist = np.asarray(totals["unc_coarse"])
    elif "unc_hist" in totals:
        hist = coarsen(np.asarray(totals["unc_hist"]))
    else:
        return {}
    edges = bin_edges(COARSE_BITS)
    R = hist.shape[0]
    out = {f"{q}_{s}": np.full(R, np.nan) for s in names for q in PIXEL_NAMES}
    for r in range(R):
        for k, s in enumerate(names):
            fd = failure_detection(np.rint(hist[r, k]), edges)
            for q in PIXEL_NAMES:
                out[f"{q}_{s}"][r] = fd[q]
    return out


def image_level_batch(W: np.ndarray, values, names: Sequence[str], settings) -> dict:
    """``spearman_<score>`` and ``qc_auroc_<score>`` of R resamples (rows of counts W (R, N))
    from the per-image ``uncertainty_<score>`` and ``miou`` values."""
    out: dict[str, np.ndarray] = {}
    miou = np.asarray(values.get("miou", np.full(W.shape[1], np.nan)), dtype=np.float64)
    for name in names:
        kind, score = ("qc_auroc", name[9:]) if name.startswith("qc_auroc_") else (
            "spearman", name[9:])  # fmt: skip
        u = np.asarray(values.get(f"uncertainty_{score}", np.full(W.shape[1], np.nan)))
        res = np.full(W.shape[0], np.nan)
        for r in range(W.shape[0]):
            idx = np.repeat(np.arange(W.shape[1]), W[r].astype(np.int64))
            if kind == "spearman":
                res[r] = spearman(u[idx], 1.0 - miou[idx])
            else:
                m = miou[idx]
                keep = np.isfinite(m)
                res[r] = auroc_exact(u[idx][keep], m[keep] < settings.qc_threshold)
        out[name] = res
    return out


def is_image_level(name: str) -> bool:
    return any(name.startswith(f"{k}_") and name[len(k) + 1 :] in SCORES for k in IMAGE_LEVEL)
