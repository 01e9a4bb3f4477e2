"""Bootstrap speed: 1000 resamples of 5000 images with 19 classes (target ≤ 2 s).

    python benchmarks/bench_bootstrap.py [N_IMAGES] [N_RESAMPLES] [CLASSES]

Per-image sums are simulated (no pixels are read); the timing covers what
``evaluate --bootstrap`` adds after the evaluation: the resampling counts, the matrix
products over every Stats field, the final formulas and the percentiles, for all 20
data-set metrics. Best of 3 runs.
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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    R = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    C = int(sys.argv[3]) if len(sys.argv) > 3 else 19
    src = simulated(n, C)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        (samples,) = bootstrap([src], n_resamples=R, seed=0)
        for s in samples.values():
            interval(s, 0.5)
        best = min(best, time.perf_counter() - t0)
    print(f"{R} resamples of {n} images, {C} classes, {len(samples)} metrics: {best:.3f} s")


if __name__ == "__main__":
    main()
