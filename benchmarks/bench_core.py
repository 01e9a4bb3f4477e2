"""Benchmark the metric core on a Cityscapes-sized map (a script, not a test).

    python benchmarks/bench_core.py [--height 1024 --width 2048 --classes 19 --repeat 3]

Prints, for HWC and CHW float32 maps in memory, the time of
  - one streaming pass over the array (``np.sum``): the floor any method must pay,
  - klseg's core (all default metrics: kl, ce, js, entropy, brier, confusion, ECE bins),
  - a naive NumPy version (one-hot targets, float64 copies, full arrays),
and the ratios core/pass and naive/pass, all measured in this one run (best of --repeat).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from klseg_cli.core import _fast
from klseg_cli.core.chunks import DEFAULT_CHUNK_PIXELS
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.engine.image import image_stats
from klseg_cli.io.readers import PredictionMap


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_map(h, w, C, rng):
    logits = rng.standard_normal((h, w, C), dtype=np.float32) * 3
    logits -= logits.max(axis=2, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=2, keepdims=True)
    labels = logits.argmax(axis=2).astype(np.uint8)
    flip = rng.random((h, w)) < 0.2
    labels[flip] = rng.integers(0, C, size=int(flip.sum()))
    labels[:16] = 255
    return logits, labels


def core(pm, labels, settings, chunk_pixels=DEFAULT_CHUNK_PIXELS, accelerate=False):
    return image_stats(pm, labels, settings, chunk_pixels=chunk_pixels, accelerate=accelerate)


def naive(p_hwc, labels, C):
    """What a first attempt looks like: float64 copies and a one-hot target."""
    p = p_hwc.reshape(-1, C).astype(np.float64)
    y = labels.reshape(-1)
    valid = y != 255
    p, y = p[valid], y[valid].astype(np.int64)
    q = np.eye(C)[y]
    logp = np.log(np.clip(p, 1e-7, 1))
    kl = (q * (np.log(np.where(q > 0, q, 1)) - logp)).sum(1)
    ce = -(q * logp).sum(1)
    m = (p + q) / 2
    with np.errstate(all="ignore"):
        js = 0.5 * np.nansum(p * np.log(p / m), 1) + 0.5 * np.nansum(q * np.log(q / m), 1)
        ent = -np.nansum(p * np.log(p), 1)
    brier = ((p - q) ** 2).sum(1)
    pred = p.argmax(1)
    conf = p.max(1)
    cm = np.zeros((C, C), np.int64)
    np.add.at(cm, (y, pred), 1)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = [np.sum(bins == b) for b in range(15)]
    return kl.sum(), ce.sum(), js.sum(), ent.sum(), brier.sum(), cm, ece


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-pixels", type=int, default=DEFAULT_CHUNK_PIXELS)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    h, w, C = args.height, args.width, args.classes
    rng = np.random.default_rng(0)
    p_hwc, labels = make_map(h, w, C, rng)
    p_chw = np.ascontiguousarray(p_hwc.transpose(2, 0, 1))
    settings = MetricSettings(num_classes=C)
    mb = p_hwc.nbytes / 1e6
    print(f"map {h}x{w}x{C} float32 ({mb:.0f} MB), best of {args.repeat}")
    naive_t = None
    if not args.skip_naive:
        naive_t = best_of(lambda: naive(p_hwc, labels, C), 1)
    for layout, arr in (("HWC", p_hwc), ("CHW", p_chw)):
        pm = PredictionMap(path="bench", array=arr, layout=layout.lower())
        t_sum = best_of(lambda a=arr: np.sum(a), 3 * args.repeat)
        t_core = best_of(lambda pm=pm: core(pm, labels, settings, args.chunk_pixels), args.repeat)
        line = (
            f"{layout}: np.sum {t_sum * 1e3:6.1f} ms | NumPy core {t_core * 1e3:6.1f} ms "
            f"= {t_core / t_sum:5.1f}x sum"
        )
        if _fast.AVAILABLE:
            core(pm, labels, settings, args.chunk_pixels, accelerate=True)  # compile
            t_fast = best_of(
                lambda pm=pm: core(pm, labels, settings, args.chunk_pixels, accelerate=True),
                args.repeat,
            )
            line += (
                f" | numba core {t_fast * 1e3:6.1f} ms = {t_fast / t_sum:5.1f}x sum, "
                f"{t_core / t_fast:4.2f}x the NumPy core"
            )
        if naive_t is not None:
            line += f" | naive {naive_t * 1e3:7.0f} ms = {naive_t / t_sum:5.0f}x sum"
            line += f" | core is {naive_t / t_core:4.0f}x faster than naive"
        print(line)


if __name__ == "__main__":
    main()
