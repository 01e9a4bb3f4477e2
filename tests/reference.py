"""An independent, slow and obvious float64 implementation of DESIGN §2, for tests only.

It builds full one-hot / smoothed targets, uses SciPy's ``rel_entr`` and ``xlogy`` and
computes every reduction directly from per-pixel arrays: nothing is shared with klseg's core.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp, rel_entr, xlogy


def to_pixels(pred: np.ndarray, layout: str) -> np.ndarray:
    """(N, C) float64 rows from an HWC / CHW / HW (binary) map."""
    a = np.asarray(pred, dtype=np.float64)
    if layout == "hwc":
        return a.reshape(-1, a.shape[-1])
    if layout == "chw":
        return a.reshape(a.shape[0], -1).T
    p1 = a.reshape(-1)
    return np.stack([1.0 - p1, p1], axis=1)


def pixel_values(p, q, *, eps=1e-7, logits=False):
    """Per-pixel metrics for (N, C) predictions p and targets q (float64)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if logits:  # DESIGN §2: log-softmax, then clipped at log eps like probabilities
        logp = p - logsumexp(p, axis=1, keepdims=True)
        p = np.exp(logp)
        logpt = np.maximum(logp, math.log(eps))
    else:
        logpt = np.log(np.maximum(p, eps))
    ce = -(q * logpt).sum(axis=1)
    kl = np.maximum(xlogy(q, q).sum(axis=1) + ce, 0.0)
    with np.errstate(all="ignore"):
        # clamped at 0 like every per-pixel KL (DESIGN §2): a float16 row summing to 0.9997
        # can give −2e-4 against a smoothed target
        kl_rev = np.maximum(rel_entr(p, q).sum(axis=1), 0.0)
    m = (p + q) / 2
    js = 0.5 * rel_entr(p, m).sum(axis=1) + 0.5 * rel_entr(q, m).sum(axis=1)
    ent = -xlogy(p, p).sum(axis=1)
    brier = ((p - q) ** 2).sum(axis=1)
    return {
        "kl": kl,
        "kl_reverse": kl_rev,
        "js": js,
        "ce": ce,
        "entropy": ent,
        "brier": brier,
        "confidence": p.max(axis=1),
        "pred": p.argmax(axis=1),
    }


def hard_targets(labels: np.ndarray, C: int, smoothing: float) -> np.ndarray:
    onehot = np.zeros((labels.size, C))
    onehot[np.arange(labels.size), labels] = 1.0
    return (1 - smoothing) * onehot + smoothing / C


def ece(conf, correct, bins=15):
    total = 0.0
    n = len(conf)
    for b in range(1, bins + 1):
        lo, hi = (b - 1) / bins, b / bins
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.sum() / n * abs(correct[sel].mean() - conf[sel].mean())
    return total


def mce(conf, correct, bins=15):
    """Largest |accuracy − confidence| over the non-empty bins ((b−1)/bins, b/bins]."""
    gaps = []
    for b in range(1, bins + 1):
        lo, hi = (b - 1) / bins, b / bins
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            gaps.append(abs(correct[sel].mean() - conf[sel].mean()))
    return max(gaps) if gaps else math.nan


def confusion(labels, pred, C):
    cm = np.zeros((C, C), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def class_scores(cm):
    tp = np.diag(cm).astype(float)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(all="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        prec = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        rec = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
    return tp, fp, fn, iou, dice, prec, rec


def nanmean(values):
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def image_metrics(vals, labels, C, log_base=math.e, bins=15):
    """per_image.csv numbers for one image's valid pixels."""
    scale = math.log(log_base)
    n = labels.size
    out = {"n_valid": n}
    for k in ("kl", "kl_reverse", "js", "ce", "entropy"):
        v = vals[k].mean() / scale if n else math.nan
        out[k] = v if math.isfinite(v) else math.nan
    out["brier"] = vals["brier"].mean() if n else math.nan
    correct = (vals["pred"] == labels).astype(float)
    out["accuracy"] = correct.mean() if n else math.nan
    cm = confusion(labels, vals["pred"], C)
    _, _, _, iou, dice, _, rec = class_scores(cm)
    out["miou"] = nanmean(iou)
    out["mdice"] = nanmean(dice)
    out["ece"] = ece(vals["confidence"], correct, bins) if n else math.nan
    out["macc"] = nanmean(rec)  # mean class recall (mAcc)
    n_target = cm.sum(axis=1).astype(float)  # frequency-weighted IoU over present classes
    out["fwiou"] = (
        float((n_target[n_target > 0] * iou[n_target > 0]).sum() / n_target.sum())
        if n_target.sum()
        else math.nan
    )
    return out


def evaluate_reference(
    images,
    C,
    *,
    smoothing=0.0,
    eps=1e-7,
    ignore=(255,),
    log_base=math.e,
    logits=False,
    soft=False,
    bins=15,
):
    """images: list of (stem, pred_pixels (N, C) float64, labels (N,) int), or with ``soft``
    (stem, pred_pixels, target_pixels (N, C) float64), whose hard label is the argmax.

    Returns (per_image rows, per_class rows, dataset dict) like klseg's reports; each row
    also holds ``ece_counts``, its pixels per ECE bin.
    """
    scale = math.log(log_base)
    rows, all_vals, all_labels = [], [], []
    for stem, pix, labels in sorted(images, key=lambda t: t[0]):
        if soft:
            q = np.asarray(labels, dtype=np.float64)
            lab = q.argmax(axis=1)
            vals = pixel_values(pix, q, eps=eps, logits=logits)
        else:
            keep = ~np.isin(labels, ignore)
            lab = labels[keep].astype(np.int64)
            q = hard_targets(lab, C, smoothing)
            vals = pixel_values(pix[keep], q, eps=eps, logits=logits)
            if smoothing == 0.0:  # KL(p‖onehot) is not computed, even where p is one-hot
                vals["kl_reverse"] = np.full(lab.size, np.inf)
        row = {"image": stem, **image_metrics(vals, lab, C, log_base, bins)}
        row["ece_counts"] = ece_bin_counts(vals["confidence"], bins)
        rows.append(row)
        all_vals.append(vals)
        all_labels.append(lab)
    vals = {k: np.concatenate([v[k] for v in all_vals]) for k in all_vals[0]}
    labels = np.concatenate(all_labels)
    pooled = image_metrics(vals, labels, C, log_base, bins)
    cm = confusion(labels, vals["pred"], C)
    tp, fp, fn, iou, dice, prec, rec = class_scores(cm)
    classes = []
    for c in range(C):
        sel = labels == c
        classes.append(
            {
                "class_id": c,
                "n_target": int(sel.sum()),
                "n_pred": int(cm[:, c].sum()),
                "tp": int(tp[c]),
                "fp": int(fp[c]),
                "fn": int(fn[c]),
                "iou": iou[c],
                "dice": dice[c],
                "precision": prec[c],
                "recall": rec[c],
                "kl": vals["kl"][sel].mean() / scale if sel.any() else math.nan,
                "ce": vals["ce"][sel].mean() / scale if sel.any() else math.nan,
            }
        )
    dataset = {}
    for k in (
        "kl",
        "kl_reverse",
        "js",
        "ce",
        "entropy",
        "brier",
        "accuracy",
        "miou",
        "mdice",
        "ece",
    ):
        dataset[f"{k}_pooled"] = pooled[k]
        dataset[f"{k}_image_mean"] = nanmean([r[k] for r in rows])
    dataset["macc_pooled"] = pooled["macc"]
    dataset["fwiou_pooled"] = pooled["fwiou"]
    correct = (vals["pred"] == labels).astype(float)
    dataset["mce_pooled"] = mce(vals["confidence"], correct, bins) if labels.size else math.nan
    return rows, classes, dataset


def ece_bin_counts(conf, bins=15):
    """Pixels per ECE bin ((b−1)/bins, b/bins], b = 1..bins, edges computed in float64:
    a confidence equal to an edge as written (0.2, 0.6, 0.75) lies in the lower bin."""
    conf = np.asarray(conf, dtype=np.float64)
    counts = np.zeros(bins, dtype=np.int64)
    for b in range(1, bins + 1):
        lo, hi = (b - 1) / bins, b / bins
        counts[b - 1] = int(((conf > lo) & (conf <= hi)).sum())
    return counts
