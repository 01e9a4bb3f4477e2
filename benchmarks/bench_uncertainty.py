"""What ``--uncertainty`` costs, and how close its histogram AUROC is to the exact one.

    python benchmarks/bench_uncertainty.py [--height 1024 --width 2048 --classes 19 --repeat 3]

For an HWC and a CHW float32 map in memory (Cityscapes-sized by default), the time of a
plain evaluation of one image through the compiled kernel and of the same with one score
(``entropy``), and with all three scores: the process's CPU time (one thread; wall time
on a shared machine varies by tens of percent), best of --repeat rounds that run the
three in turn, all in this one run; then the
pooled AUROC, AURC and UEO from the histograms against an exact float64 computation over
every pixel (scipy's Mann–Whitney U, a direct sort, every threshold), with the bounds the
histograms report.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from klseg_cli.core import uncertainty as unc
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.engine.image import image_stats
from klseg_cli.io.readers import PredictionMap


def make_map(h, w, C, rng):
    """Softmax of sharp logits; labels drawn from the map itself (errors where uncertain),
    a tenth of the pixels saturated (one-hot, score exactly 0)."""
    p = rng.standard_normal((h, w, C), dtype=np.float32) * 4
    p -= p.max(axis=2, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=2, keepdims=True)
    hot = rng.random((h, w)) < 0.1
    arg = p.argmax(axis=2)
    p[hot] = 0.0
    p[hot, arg[hot]] = 1.0
    u = rng.random((h, w, 1), dtype=np.float32)
    draw = u < np.cumsum(p, axis=2)
    labels = np.where(draw.any(axis=2), draw.argmax(axis=2), C - 1).astype(np.uint8)
    labels[:16] = 255
    return p, labels


def exact(p_hwc, labels, C):
    from scipy.stats import mannwhitneyu

    p = p_hwc.reshape(-1, C)
    y = labels.reshape(-1)
    keep = y != 255
    p, y = p[keep], y[keep]
    conf = p.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(p.astype(np.float64) * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    wrong = p.argmax(axis=1) != y
    out = {}
    for name, u in (("entropy", ent), ("maxprob", 1.0 - conf.astype(np.float64))):
        u = np.maximum(u, 0.0)
        nw, nc = wrong.sum(), (~wrong).sum()
        auroc = mannwhitneyu(u[wrong], u[~wrong]).statistic / (nw * nc)
        order = np.argsort(u, kind="stable")
        # tie groups get their expected error count (the convention of DESIGN §11.2)
        us, ws = u[order], wrong[order].astype(np.float64)
        _, start = np.unique(us, return_index=True)
        stop = np.r_[start[1:], us.size]
        n_g = stop - start
        w_g = np.add.reduceat(ws, start)
        E0 = np.r_[0.0, np.cumsum(w_g)[:-1]]
        j = np.arange(us.size) - np.repeat(start, n_g) + 1
        e = np.repeat(E0, n_g) + j * np.repeat(w_g / n_g, n_g)
        aurc = float(np.mean(e / np.arange(1, us.size + 1)))
        out[name] = (auroc, aurc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-exact", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    C = args.classes
    p_hwc, labels = make_map(args.height, args.width, C, rng)
    p_chw = np.ascontiguousarray(p_hwc.transpose(2, 0, 1))
    plain = MetricSettings(num_classes=C)
    one = MetricSettings(num_classes=C, uncertainty=("entropy",))
    three = MetricSettings(num_classes=C, uncertainty=("entropy", "maxprob", "margin"))
    print(f"{args.height}x{args.width}, {C} classes, float32, compiled kernel, CPU time, "
          f"best of {args.repeat}")  # fmt: skip
    for layout, arr in (("hwc", p_hwc), ("chw", p_chw)):
        pm = PredictionMap(path="bench", array=arr, layout=layout)
        configs = (("plain", plain), ("entropy", one), ("3 scores", three))
        for _, s in configs:  # warm up (compiles on a first run)
            image_stats(pm, labels, s, accelerate=True)
        t = dict.fromkeys((name for name, _ in configs), float("inf"))
        for _ in range(args.repeat):  # interleaved: each round sees the same machine load
            for name, s in configs:
                t0 = time.process_time()  # CPU time: other work on the machine adds none
                image_stats(pm, labels, s, accelerate=True)
                t[name] = min(t[name], time.process_time() - t0)
        print(f"  {layout}: plain {t['plain']:.3f} s, +entropy {t['entropy']:.3f} s "
              f"({100 * (t['entropy'] / t['plain'] - 1):+.1f}%), +3 scores {t['3 scores']:.3f} s "
              f"({100 * (t['3 scores'] / t['plain'] - 1):+.1f}%)")  # fmt: skip
    if args.skip_exact:
        return
    pm = PredictionMap(path="bench", array=p_hwc, layout="hwc")
    stats = image_stats(pm, labels, three, accelerate=True)
    ref = exact(p_hwc, labels, C)
    for s, name in enumerate(three.uncertainty):
        fd = unc.failure_detection(stats.unc_hist[s])
        line = (f"  {name}: AUROC {fd['auroc']:.6f} (bound {fd['auroc_bound']:.2e}), "
                f"AURC {fd['aurc']:.6f} (bound {fd['aurc_bound']:.2e})")  # fmt: skip
        if name in ref:
            ea, er = ref[name]
            line += f"; exact AUROC {ea:.6f} (|d| {abs(fd['auroc'] - ea):.1e}), "
            line += f"exact AURC {er:.6f} (|d| {abs(fd['aurc'] - er):.1e})"
        print(line)


if __name__ == "__main__":
    main()
