"""Multi-rater references (DESIGN §11.2, docs/design/multi-rater.md): sums and formulas.

Several raters label the same image; their per-pixel frequency map q is the target
distribution (``frequency_map``). Besides the usual metrics against q, three scores of
multi-rater work are computed here, all from integer counts that merge by ``+`` across
chunks, images and workers (``RaterStats``):

- soft Dice (the QUBIQ challenge's score): per class, the Dice of the prediction p_c and
  the raters' frequency q_c both binarised at the thresholds 0.1, 0.2, ..., 0.9, averaged
  over the thresholds. Kept as a per-class joint histogram of how many thresholds each
  pixel's p_c and q_c exceed (``DICE_THRESHOLDS``; 10 × 10 counts a class).
- the generalized energy distance (Kohl et al. 2018) between the model's samples and the
  raters' maps with d = 1 − IoU; and the mean IoU of the prediction against each rater
  beside the raters' own pairwise IoU. Kept as per-class intersection and union counts of
  every unordered pair of "items" (the prediction's argmax, the samples, the raters).

Items are label maps as class codes: −1 where a rater ignored a pixel (the samples and the
prediction are defined on every pixel that some rater labelled). A pair is compared on the
pixels both items label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from .metrics import MetricSettings
from .results import EvaluationResult, ImageResult

DICE_THRESHOLDS = tuple(k / 10 for k in range(1, 10))
"""τ_k = k/10, k = 1..9 (QUBIQ). p_c > τ_k is compared in float64; q_c > τ_k exactly, as
10·n_c > k·n on the rater counts, so 3 of 10 raters are not above 0.3."""
N_LEVELS = len(DICE_THRESHOLDS) + 1  # a pixel exceeds 0..9 thresholds

RATER_METRICS = ("soft_dice", "ged", "miou_vs_raters", "rater_pairwise_miou")
"""Per-image columns (``per_image.csv``) and ``*_pooled`` / ``*_image_mean`` dataset keys."""


def dataset_names() -> list[str]:
    """The ``summary.json`` dataset keys of a multi-rater evaluation (``--rater``)."""
    return [f"{m}_{kind}" for m in RATER_METRICS for kind in ("pooled", "image_mean")]


def frequency_map(codes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, n): the raters' frequency map (C, n) float32 and how many raters label each pixel.

    ``codes`` is (R, n): class codes, negative where a rater ignored the pixel. q is 0 where
    no rater labels a pixel (those pixels are ignored by the caller). float32 division of
    two exact integers is correctly rounded: q is the float32 nearest n_c / n.
    """
    return frequency_from_counts(class_counts(codes, num_classes), (codes >= 0).sum(axis=0))


def frequency_from_counts(counts: np.ndarray, raters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``frequency_map`` of the (C, n) class counts and the (n,) rater counts."""
    q = counts.astype(np.float32)
    np.divide(q, np.maximum(raters, 1).astype(np.float32), out=q)
    return q, raters


def class_counts(codes: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, n) int64: how many raters gave each pixel each class."""
    R, n = codes.shape
    cols = np.broadcast_to(np.arange(n), (R, n))
    ok = codes >= 0
    flat = codes[ok].astype(np.int64) * n + cols[ok]
    return np.bincount(flat, minlength=num_classes * n).reshape(num_classes, n)


_TAUS64 = np.asarray(DICE_THRESHOLDS, dtype=np.float64)
_TAUS32_ABOVE = np.nextafter(_TAUS64.astype(np.float32), np.float32(np.inf))
_TAUS32_ABOVE = np.where(
    _TAUS64.astype(np.float32).astype(np.float64) > _TAUS64, _TAUS64.astype(np.float32),
    _TAUS32_ABOVE,
)  # fmt: skip
"""The smallest float32 above each τ_k (as a double): a float32 p exceeds τ_k exactly when
p ≥ this, so float32 maps are compared without a float64 copy."""


_ABOVE = {
    np.dtype(np.float32): _TAUS32_ABOVE.astype(np.float32),
    np.dtype(np.float64): np.nextafter(_TAUS64, np.inf),
}


def threshold_levels_p(P: np.ndarray) -> np.ndarray:
    """(C, n) int8: how many of the thresholds τ_k each p_c exceeds (p > τ_k in float64):
    p > τ_k ⇔ p ≥ the float just above τ_k, nine comparisons in the chunk's dtype."""
    if P.dtype not in _ABOVE:
        P = P.astype(np.float64)
    level = np.zeros(P.shape, dtype=np.int8)
    hit = np.empty(P.shape, dtype=bool)
    for bound in _ABOVE[P.dtype]:
        np.greater_equal(P, bound, out=hit)
        level += hit
    return level


def _level_table(max_raters: int) -> np.ndarray:
    """T[n, n_c]: how many τ_k = k/10 the fraction n_c/n exceeds, exactly: the k with
    10·n_c > k·n, i.e. ceil(10·n_c / n) − 1 of them (0 when n_c = 0; row n = 0 unused)."""
    n = np.maximum(np.arange(max_raters + 1), 1)[:, None]
    nc = np.arange(max_raters + 1)[None, :]
    return np.clip((10 * nc + n - 1) // n - 1, 0, N_LEVELS - 1).astype(np.int8)


def threshold_levels_q(counts: np.ndarray, raters: np.ndarray) -> np.ndarray:
    """(C, n) int8: how many τ_k each q_c = n_c / n exceeds, compared exactly (integers)."""
    R = int(raters.max(initial=0))
    table = _level_table(R).reshape(-1)
    index = raters.astype(np.intp) * (R + 1) + counts
    return table[index]


def item_pairs(n_items: int) -> list[tuple[int, int]]:
    """The unordered pairs (a, b), a < b, of ``n_items`` items, in a fixed order."""
    return list(combinations(range(n_items), 2))


@dataclass
class RaterStats:
    """Counts of one chunk, image or data set for the multi-rater scores. Merge with ``+``.

    Items are, in order: the prediction's argmax, the samples (none when the prediction
    is the only sample), the raters.
    """

    n_raters: int
    n_samples: int  # 0: the prediction's argmax is the model's one sample
    dice_joint: np.ndarray  # (C, N_LEVELS, N_LEVELS) int64: pixels by (level of p_c, of q_c)
    pair_inter: np.ndarray  # (n_pairs, C) int64: |a = c ∧ b = c| on pixels both label
    pair_union: np.ndarray  # (n_pairs, C) int64: |a = c ∨ b = c| on pixels both label

    @classmethod
    def zeros(cls, num_classes: int, n_raters: int, n_samples: int = 0) -> RaterStats:
        n_pairs = len(item_pairs(1 + n_samples + n_raters))
        return cls(
            n_raters=n_raters,
            n_samples=n_samples,
            dice_joint=np.zeros((num_classes, N_LEVELS, N_LEVELS), dtype=np.int64),
            pair_inter=np.zeros((n_pairs, num_classes), dtype=np.int64),
            pair_union=np.zeros((n_pairs, num_classes), dtype=np.int64),
        )

    @property
    def num_classes(self) -> int:
        return self.dice_joint.shape[0]

    def __add__(self, other: RaterStats) -> RaterStats:
        if (self.n_raters, self.n_samples) != (other.n_raters, other.n_samples):
            raise ValueError("RaterStats of different rater or sample counts do not merge")
        return RaterStats(
            self.n_raters,
            self.n_samples,
            self.dice_joint + other.dice_joint,
            self.pair_inter + other.pair_inter,
            self.pair_union + other.pair_union,
        )

    @classmethod
    def from_chunk(
        cls,
        P: np.ndarray,
        pred: np.ndarray,
        rater_codes: np.ndarray,
        sample_codes: np.ndarray | None = None,
        *,
        counts: np.ndarray | None = None,
    ) -> RaterStats:
        """The counts of one chunk of pixels that some rater labels.

        ``P`` (C, n) the prediction's probabilities, ``pred`` (n,) its argmax,
        ``rater_codes`` (R, n) the raters' class codes (negative: ignored by that rater),
        ``sample_codes`` (S, n) the samples' argmax, or None; ``counts`` (C, n) the raters'
        class counts when the caller has them (``class_counts``).
        """
        C = P.shape[0]
        R = rater_codes.shape[0]
        S = 0 if sample_codes is None else sample_codes.shape[0]
        out = cls.zeros(C, R, S)
        if counts is None:
            counts = class_counts(rater_codes, C)
        raters = (rater_codes >= 0).sum(axis=0)
        key = threshold_levels_p(P).astype(np.intp)
        key *= N_LEVELS
        key += threshold_levels_q(counts, raters)
        key += (np.arange(C, dtype=np.intp) * N_LEVELS * N_LEVELS)[:, None]
        joint = np.bincount(key.reshape(-1), minlength=C * N_LEVELS * N_LEVELS)
        out.dice_joint[...] = joint.reshape(C, N_LEVELS, N_LEVELS)
        items = [np.asarray(pred, dtype=np.int64)[None]]
        if S:
            items.append(np.asarray(sample_codes, dtype=np.int64))
        items.append(np.asarray(rater_codes, dtype=np.int64))
        stack = np.concatenate(items, axis=0)
        for k, (a, b) in enumerate(item_pairs(stack.shape[0])):
            inter, union = pair_counts(stack[a], stack[b], C)
            out.pair_inter[k] = inter
            out.pair_union[k] = union
        return out


def pair_counts(a: np.ndarray, b: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union of two code maps on the pixels both label."""
    C = num_classes
    both = (a >= 0) & (b >= 0)
    joint = np.bincount(a[both] * C + b[both], minlength=C * C).reshape(C, C)
    inter = np.diagonal(joint).copy()
    union = joint.sum(axis=1) + joint.sum(axis=0) - inter
    return inter, union


# --- formulas (ratios taken once, from merged counts) ---------------------------------------


def soft_dice_per_class(stats: RaterStats) -> np.ndarray:
    """(C,) soft Dice: per class the mean over τ_k of 2|A∩B| / (|A| + |B|), A = {p_c > τ_k},
    B = {q_c > τ_k}; a threshold where both are empty scores 1 (QUBIQ), a class empty in
    both at every threshold (so at 0.1) is undefined (NaN, left out of class means)."""
    joint = stats.dice_joint.astype(np.float64)  # (C, level of p, level of q)
    hist = np.stack([joint.sum(axis=2), joint.sum(axis=1), _min_hist(joint)], axis=1)
    # pixels exceeding at least k thresholds: reverse cumulative sums, k = 1..9
    above = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]
    a, b, inter = above[:, 0], above[:, 1], above[:, 2]
    size = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(size > 0, 2.0 * inter / np.where(size > 0, size, 1.0), 1.0)
    out = dice.mean(axis=1)
    out[size[:, 0] == 0] = np.nan
    return out


def _min_hist(joint: np.ndarray) -> np.ndarray:
    """(C, N_LEVELS) pixels by min(level of p, level of q), from the joint histogram."""
    i, j = np.meshgrid(np.arange(N_LEVELS), np.arange(N_LEVELS), indexing="ij")
    low = np.minimum(i, j).reshape(-1)
    flat = joint.reshape(joint.shape[0], -1)
    return np.stack([flat[:, low == k].sum(axis=1) for k in range(N_LEVELS)], axis=1)


def pair_iou(stats: RaterStats) -> np.ndarray:
    """(n_pairs, C) IoU of each item pair and class; NaN where the union is empty."""
    inter = stats.pair_inter.astype(np.float64)
    union = stats.pair_union.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)


def _class_mean(values: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Mean over ``classes`` of the defined values of each row; NaN when none is defined."""
    sub = values[:, list(classes)]
    ok = ~np.isnan(sub)
    n = ok.sum(axis=1)
    total = np.where(ok, sub, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def item_distances(stats: RaterStats, classes: Sequence[int]) -> np.ndarray:
    """(K, K) d = 1 − mIoU between items (mean over ``classes`` present in either item);
    d = 0 when no class of ``classes`` is present in either (Kohl et al.'s empty case)."""
    miou = _class_mean(pair_iou(stats), classes)
    d = np.where(np.isnan(miou), 0.0, 1.0 - miou)
    K = 1 + stats.n_samples + stats.n_raters
    D = np.zeros((K, K))
    for k, (a, b) in enumerate(item_pairs(K)):
        D[a, b] = D[b, a] = d[k]
    return D


def ged(stats: RaterStats, classes: Sequence[int]) -> float:
    """D²_GED = 2 E d(S, Y) − E d(S, S') − E d(Y, Y') over all sample × rater, sample ×
    sample and rater × rater pairs, the identical pairs (d = 0) included (Kohl et al.)."""
    D = item_distances(stats, classes)
    S = stats.n_samples
    samples = list(range(1, 1 + S)) if S else [0]
    raters = list(range(1 + S, 1 + S + stats.n_raters))
    sy = D[np.ix_(samples, raters)].mean()
    ss = D[np.ix_(samples, samples)].mean()
    yy = D[np.ix_(raters, raters)].mean()
    return float(2.0 * sy - ss - yy)


def rater_mious(stats: RaterStats, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(mIoU of the prediction against each rater (R,), mIoU of each rater pair); NaN where
    no class of ``classes`` is present in either map (DESIGN §2's rule for means)."""
    miou = _class_mean(pair_iou(stats), classes)
    K = 1 + stats.n_samples + stats.n_raters
    first = 1 + stats.n_samples
    index = {pair: k for k, pair in enumerate(item_pairs(K))}
    vs = np.array([miou[index[(0, first + r)]] for r in range(stats.n_raters)])
    pairwise = np.array(
        [miou[index[(first + r, first + s)]] for r, s in item_pairs(stats.n_raters)]
    )
    return vs, pairwise


def _nanmean(values) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def rater_values(stats: RaterStats, classes: Sequence[int]) -> dict[str, float]:
    """The four scores of one image's (or the pooled) counts, named as RATER_METRICS."""
    vs, pairwise = rater_mious(stats, classes)
    return {
        "soft_dice": _nanmean(soft_dice_per_class(stats)[list(classes)]),
        "ged": ged(stats, classes),
        "miou_vs_raters": _nanmean(vs),
        "rater_pairwise_miou": _nanmean(pairwise),
    }


def dataset_values(
    images: Sequence[RaterStats], classes: Sequence[int]
) -> tuple[dict[str, float], RaterStats | None]:
    """(``*_pooled`` from the summed counts and ``*_image_mean`` over the images, the
    summed counts)."""
    if not images:
        return {name: math.nan for name in dataset_names()}, None
    total = images[0]
    for stats in images[1:]:
        total = total + stats
    pooled = rater_values(total, classes)
    per_image = [rater_values(s, classes) for s in images]
    out = {}
    for name in RATER_METRICS:
        out[f"{name}_pooled"] = pooled[name]
        out[f"{name}_image_mean"] = _nanmean([v[name] for v in per_image])
    return out, total


# --- per-image arrays (stats.npz) and the batched formulas (the bootstrap) ----------------

RATER_FIELDS = ("dice_joint", "pair_inter", "pair_union")
"""The RaterStats arrays stored per image in ``stats.npz`` (as ``rater_<field>``)."""


def stack_rater_stats(images: Sequence[RaterStats], template: RaterStats) -> dict[str, np.ndarray]:
    """{field: (N, ...) int64}: each image's counts stacked (``template`` gives the shapes
    when there are no images)."""
    return {
        name: np.stack([getattr(s, name) for s in images]).astype(np.int64)
        if images else np.empty((0, *getattr(template, name).shape), np.int64)
        for name in RATER_FIELDS
    }  # fmt: skip


def unstack_rater_stats(arrays, i: int, n_raters: int, n_samples: int) -> RaterStats:
    """Image ``i``'s RaterStats from the stacked arrays."""
    return RaterStats(
        n_raters, n_samples, *(np.array(arrays[f][i], np.int64) for f in RATER_FIELDS)
    )


def _tail_matrix() -> np.ndarray:
    """(L², 27) 0/1: which of |A_τk|, |B_τk|, |A_τk ∩ B_τk| (k = 1..9) a pixel of joint
    levels (i, j) counts in: i ≥ k, j ≥ k, min(i, j) ≥ k."""
    i, j = np.meshgrid(np.arange(N_LEVELS), np.arange(N_LEVELS), indexing="ij")
    k = np.arange(1, N_LEVELS)
    parts = [level.reshape(-1, 1) >= k for level in (i, j, np.minimum(i, j))]
    return np.concatenate(parts, axis=1).astype(np.float64)


def dice_tails(dice_joint: np.ndarray) -> np.ndarray:
    """(..., C, 3, 9) float64: per class, the pixels with p_c, q_c and both above each τ_k
    (|A_τ|, |B_τ|, |A_τ ∩ B_τ|) from the joint level histograms (..., C, 10, 10), by one
    product with a 0/1 matrix (exact below 2⁵³). Linear in the counts, so the tails of a
    sum of images are the sum of their tails."""
    joint = np.asarray(dice_joint, dtype=np.float64)
    flat = joint.reshape(-1, N_LEVELS * N_LEVELS) @ _tail_matrix()
    return flat.reshape(*joint.shape[:-2], 3, N_LEVELS - 1)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the defined values; NaN where none is (no warnings)."""
    ok = ~np.isnan(values)
    n = ok.sum(axis=-1)
    total = np.where(ok, values, 0.0).sum(axis=-1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def rater_values_batch(
    tails: np.ndarray, inter: np.ndarray, union: np.ndarray, *, n_raters: int,
    n_samples: int, classes: Sequence[int],
) -> dict[str, np.ndarray]:  # fmt: skip
    """``rater_values`` of B sets of counts at once: ``tails`` (B, C, 3, 9) (``dice_tails``),
    ``inter``/``union`` (B, n_pairs, C), float or int. The same formulas over a leading
    axis (tested against ``rater_values``); {name: (B,)}, named as RATER_METRICS."""
    keep = list(classes)
    t = np.asarray(tails, dtype=np.float64)[:, keep]
    a, b, both = t[..., 0, :], t[..., 1, :], t[..., 2, :]
    size = a + b
    dice = np.where(size > 0, 2.0 * both / np.where(size > 0, size, 1.0), 1.0).mean(axis=-1)
    dice[size[..., 0] == 0] = np.nan
    i = np.asarray(inter, dtype=np.float64)[..., keep]
    u = np.asarray(union, dtype=np.float64)[..., keep]
    iou = np.where(u > 0, i / np.where(u > 0, u, 1.0), np.nan)
    miou = _nanmean_rows(iou)  # (B, n_pairs)
    d = np.where(np.isnan(miou), 0.0, 1.0 - miou)
    K = 1 + n_samples + n_raters
    index = {pair: k for k, pair in enumerate(item_pairs(K))}
    samples = list(range(1, 1 + n_samples)) if n_samples else [0]
    raters = list(range(1 + n_samples, K))

    def mean_d(xs, ys) -> np.ndarray:  # mean over ordered pairs, identical ones (d = 0) too
        cols = [index[(min(x, y), max(x, y))] for x in xs for y in ys if x != y]
        total = d[:, cols].sum(axis=1) if cols else np.zeros(d.shape[0])
        return total / (len(xs) * len(ys))

    ged_ = 2.0 * mean_d(samples, raters) - mean_d(samples, samples) - mean_d(raters, raters)
    vs = miou[:, [index[(0, r)] for r in raters]]
    pairwise = miou[:, [index[pair] for pair in combinations(raters, 2)]]
    return {
        "soft_dice": _nanmean_rows(dice),
        "ged": ged_,
        "miou_vs_raters": _nanmean_rows(vs),
        "rater_pairwise_miou": _nanmean_rows(pairwise),
    }


def disagreement(codes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(1 − max_c q_c (n,) float32, labelled (n,) bool): the share of a pixel's raters who
    did not give the most frequent label; 0 where they all agree."""
    q, raters = frequency_map(codes, num_classes)
    return (1.0 - q.max(axis=0)).astype(np.float32), raters > 0


# --- the results of an evaluation against raters (engine/raters.py, stats.npz) -------------


@dataclass
class RaterImageResult(ImageResult):
    """One image evaluated against its raters: the usual sums and the multi-rater counts."""

    raters: RaterStats | None = None
    rater_paths: tuple[Path, ...] = ()

    def row(self, settings: MetricSettings) -> dict:
        row = super().row(settings)
        if self.raters is not None:
            row.update(rater_values(self.raters, settings.mean_classes))
        return row


@dataclass
class RaterEvaluationResult(EvaluationResult):
    """An EvaluationResult with the multi-rater scores in its summary."""

    rater_settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = super().summary()
        out["settings"]["raters"] = dict(self.rater_settings)
        classes = self.settings.mean_classes
        counts = [i.raters for i in self.images if getattr(i, "raters", None) is not None]
        values, total = dataset_values(counts, classes)
        out["dataset"].update(values)
        per_class = (
            soft_dice_per_class(total) if total is not None else [math.nan] * len(out["classes"])
        )
        for row, value in zip(out["classes"], per_class):
            row["soft_dice"] = float(value)
        return out
