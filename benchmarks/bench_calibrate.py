"""Benchmark fitting a temperature (a script, not a test).

    python benchmarks/bench_calibrate.py [--height 1024 --width 2048 --classes 19 --repeat 3]

Two data sets: the 8 maps of sample_data/, and one Cityscapes-sized float32 map (HWC .npy
in a temporary folder, an over-confident softmax(z / 0.6) with labels drawn from
softmax(z), so the optimum is T ≈ 1.67). For each it prints the time of one ``evaluate``
of the same files (in this process, kernel where it applies), the time of the temperature
fit alone (``calibration.fit_temperature`` over every valid pixel), its passes, and the
ratio fit / evaluate (best of --repeat each, all measured in this one run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from klseg_cli.commands.calibrate import _pixel_count
from klseg_cli.core.calibration import fit_temperature
from klseg_cli.engine.fit import PairData
from klseg_cli.engine.local import evaluate, plan

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def fit(pred, gt, **options):
    job = plan(pred, gt, **options)
    pairs = job.pairing.pairs
    hint = _pixel_count(pairs, job.settings, job.read)
    return fit_temperature(PairData(pairs, job.settings, job.read, n_pixels=hint))


def make_big(folder: Path, h: int, w: int, C: int, rng) -> None:
    (folder / "pred").mkdir()
    (folder / "gt").mkdir()
    out = np.lib.format.open_memmap(folder / "pred" / "big.npy", "w+", np.float32, (h, w, C))
    labels = np.empty((h, w), np.uint8)
    for r in range(0, h, 64):
        z = rng.standard_normal((min(64, h - r), w, C), dtype=np.float32) * 2.0
        p = np.exp(z - z.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        u = rng.random((*p.shape[:2], 1), dtype=np.float32)
        labels[r : r + 64] = np.minimum((u > np.cumsum(p, axis=2)).sum(axis=2), C - 1)
        zs = z / 0.6
        q = np.exp(zs - zs.max(axis=2, keepdims=True))
        q /= q.sum(axis=2, keepdims=True)
        out[r : r + 64] = q
    labels[:16] = 255
    out.flush()
    del out
    np.save(folder / "gt" / "big.npy", labels)


def report(name, pred, gt, repeat, **options):
    t_eval, _ = best_of(lambda: evaluate(pred, gt, **options), repeat)
    t_fit, result = best_of(lambda: fit(pred, gt, **options), repeat)
    print(f"{name}: evaluate {t_eval * 1e3:.0f} ms; fit {t_fit * 1e3:.0f} ms in "
          f"{result.n_passes} pass(es) (T = {result.temperature:.6g}); "
          f"fit / evaluate = {t_fit / t_eval:.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sample = ROOT / "sample_data"
    report("sample_data (8 maps)", sample / "predictions", sample / "ground_truth", args.repeat,
           classes=str(sample / "classes.txt"))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_big(folder, args.height, args.width, args.classes, np.random.default_rng(0))
        evaluate(folder / "pred", folder / "gt")  # warm the page cache and the kernel
        report(f"{args.height}x{args.width}x{args.classes} HWC .npy", folder / "pred",
               folder / "gt", args.repeat)  # fmt: skip


if __name__ == "__main__":
    main()
