"""Benchmark an evaluation against several raters (a script, not a test).

    python benchmarks/bench_raters.py [--height 512 --width 1024 --classes 19 --raters 3
                                       --samples 0 --repeat 3]

One float32 HWC map and R rater masks (PNG) in a temporary folder, and the raters'
frequency map saved as a float32 .npy. Prints, best of --repeat each, all in this one run:
``evaluate --soft-gt`` on the saved frequency map (the §2 metrics only, reading a C-plane
float target), ``evaluate --rater`` (the same §2 metrics against q made from the masks, plus
soft Dice, GED and the IoU counts), and their ratio; and the share of the multi-rater
sums (``RaterStats.from_chunk``) in the rater run, from a profile.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from klseg_cli.engine.local import evaluate
from klseg_cli.engine.raters import evaluate_raters


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make(root: Path, H: int, W: int, C: int, R: int, S: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for d in ("pred", "soft", *(f"r{r}" for r in range(R)), *(f"s{k}" for k in range(S))):
        (root / d).mkdir()

    def probs():
        z = rng.normal(0, 3, (H, W, C)).astype(np.float32)
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(-1, keepdims=True)

    np.save(root / "pred" / "a.npy", probs())
    for k in range(S):
        np.save(root / f"s{k}" / "a.npy", probs())
    block = 16
    truth = rng.integers(0, C, (-(-H // block), -(-W // block)))
    truth = truth.repeat(block, 0).repeat(block, 1)[:H, :W]
    masks = []
    for r in range(R):
        m = np.where(rng.random((H, W)) < 0.1, rng.integers(0, C, (H, W)), truth).astype(np.uint8)
        Image.fromarray(m).save(root / f"r{r}" / "a.png")
        masks.append(m)
    stack = np.stack(masks)
    q = np.stack([(stack == c).mean(0) for c in range(C)], -1).astype(np.float32)
    np.save(root / "soft" / "a.npy", q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--raters", type=int, default=3)
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make(root, a.height, a.width, a.classes, a.raters, a.samples)
        raters = [root / f"r{r}" for r in range(a.raters)]
        samples = [root / f"s{k}" for k in range(a.samples)]
        evaluate_raters(root / "pred", raters, samples=samples)  # warm up imports and caches
        soft = best_of(lambda: evaluate(root / "pred", root / "soft", soft_gt=True), a.repeat)
        multi = best_of(lambda: evaluate_raters(root / "pred", raters, samples=samples), a.repeat)
        prof = cProfile.Profile()
        prof.runcall(evaluate_raters, root / "pred", raters, samples=samples)
        stats = pstats.Stats(prof)
        total = sum(v[3] for k, v in stats.stats.items() if k[2] == "evaluate_raters")
        sums = sum(v[3] for k, v in stats.stats.items() if k[2] == "from_chunk")
    print(f"{a.height}x{a.width}, {a.classes} classes, {a.raters} raters, {a.samples} samples")
    print(f"evaluate --soft-gt (frequency map file): {soft:.3f} s")
    print(f"evaluate --rater:                         {multi:.3f} s  ({multi / soft:.2f}x)")
    print(f"multi-rater sums in the rater run (profiled): {sums:.3f} of {total:.3f} s")


if __name__ == "__main__":
    main()
