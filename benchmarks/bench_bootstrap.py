"""Bootstrap speed: 1000 resamples of 5000 images with 19 classes (target ≤ 2 s).

    python benchmarks/bench_bootstrap.py [N_IMAGES] [N_RESAMPLES] [CLASSES] [--raters R]

Per-image sums are simulated (no pixels are read); the timing covers what
``evaluate --bootstrap`` adds after the evaluation: the resampling counts, the matrix
products over every Stats field, the final formulas and the percentiles, for all 20
data-set metrics. Best of 3 runs. ``--raters R``: an ``evaluate --rater`` run with R raters
(the prediction's argmax as its one sample), so the per-image multi-rater counts of
stats.npz are resampled too (soft Dice, GED, IoU against the raters: the 8 rater scores),
timed against the same run without them.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from klseg_cli.core.bootstrap import Source, bootstrap, interval
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.core.stats import IMAGE_MEAN_METRICS


def simulated(n: int, C: int, bins: int = 15, seed: int = 0) -> Source:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(50_000, 2_000_000, size=n)
    confusion = rng.multinomial(1, np.full(C * C, 1 / (C * C)), size=n).reshape(n, C, C)
    eye = np.eye(C, dtype=np.int64)
    confusion = (confusion + eye) * pixels[:, None, None]
    sums = rng.gamma(2.0, 0.1, size=(n, 6)) * pixels[:, None]
    sums[:, 1] = np.nan  # reverse KL undefined, as against hard labels
    count = rng.multinomial(1000, np.full(bins, 1 / bins), size=n).astype(np.int64)
    arrays = {
        "sums": sums,
        "confusion": confusion.astype(np.int64),
        "class_kl": rng.random((n, C)),
        "class_ce": rng.random((n, C)),
        "ece_count": count,
        "ece_conf": count * rng.random((n, bins)),
        "ece_correct": (count * rng.random((n, bins))).astype(np.int64),
        "n_clipped": rng.integers(0, 10, size=n),
    }
    values = {m: rng.random(n) for m in IMAGE_MEAN_METRICS}
    names = [f"{m}_{k}" for m in IMAGE_MEAN_METRICS for k in ("pooled", "image_mean")]
    return Source(arrays, values, MetricSettings(num_classes=C), names)


def with_raters(src: Source, n_raters: int, seed: int = 1) -> Source:
    """``src`` with simulated per-image multi-rater counts (stats.npz's rater_* arrays)."""
    from klseg_cli.core.raters import N_LEVELS, RATER_METRICS, item_pairs

    rng = np.random.default_rng(seed)
    n, C = len(src), src.settings.num_classes
    pairs = len(item_pairs(1 + n_raters))
    inter = rng.integers(0, 100_000, size=(n, pairs, C))
    arrays = {
        "dice_joint": rng.integers(0, 10_000, size=(n, C, N_LEVELS, N_LEVELS)),
        "pair_inter": inter,
        "pair_union": inter + rng.integers(0, 30_000, size=(n, pairs, C)),
    }
    names = [f"{m}_{k}" for m in RATER_METRICS for k in ("pooled", "image_mean")]
    values = dict(src.image_values, **{m: rng.random(n) for m in RATER_METRICS})
    return Source(src.arrays, values, src.settings, [*src.names, *names],
                  rater_items=(n_raters, 0), rater_arrays=arrays)  # fmt: skip


def best_of_3(src: Source, R: int) -> tuple[float, int]:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        (samples,) = bootstrap([src], n_resamples=R, seed=0)
        for s in samples.values():
            interval(s, 0.5)
        best = min(best, time.perf_counter() - t0)
    return best, len(samples)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    raters = int(sys.argv[sys.argv.index("--raters") + 1]) if "--raters" in sys.argv else 0
    if raters:
        args.remove(str(raters))
    n = int(args[0]) if len(args) > 0 else 5000
    R = int(args[1]) if len(args) > 1 else 1000
    C = int(args[2]) if len(args) > 2 else 19
    src = simulated(n, C)
    best, k = best_of_3(src, R)
    print(f"{R} resamples of {n} images, {C} classes, {k} metrics: {best:.3f} s")
    if raters:
        best_r, k = best_of_3(with_raters(src, raters), R)
        print(f"  with {raters} raters' counts, {k} metrics: {best_r:.3f} s "
              f"(+{best_r - best:.3f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
