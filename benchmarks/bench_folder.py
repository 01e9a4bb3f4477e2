"""Folder throughput: klseg evaluate on N Cityscapes-sized maps vs. just loading them.

    python benchmarks/bench_folder.py [--n 40] [--height 1024 --width 2048 --classes 19]

Writes N float32 (H, W, C) .npy maps and uint8 PNG targets into a temporary folder, warms
the page cache, then measures in one run: ``np.load`` of every map (the floor), and
``klseg evaluate`` with --jobs 1 and --jobs 2 (whole processes, start-up included).
Prints the ratios evaluate/load and jobs1/jobs2, and checks the two runs agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=19)
    args = ap.parse_args()
    h, w, C = args.height, args.width, args.classes
    root = Path(tempfile.mkdtemp(prefix="klseg-folder-"))
    try:
        (root / "pred").mkdir()
        (root / "gt").mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.n):
            z = rng.standard_normal((h, w, C), dtype=np.float32) * 3
            z -= z.max(axis=2, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=2, keepdims=True)
            np.save(root / "pred" / f"img{i:03d}.npy", z)
            Image.fromarray(z.argmax(axis=2).astype(np.uint8)).save(root / "gt" / f"img{i:03d}.png")
        files = sorted((root / "pred").glob("*.npy"))
        gb = sum(f.stat().st_size for f in files) / 1e9
        print(f"{args.n} maps {h}x{w}x{C} float32, {gb:.1f} GB")

        def load_all():
            for f in files:
                np.load(f)

        load_all()  # warm the page cache
        t0 = time.perf_counter()
        load_all()
        t_load = time.perf_counter() - t0

        def run(jobs):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "klseg_cli", "evaluate", str(root / "pred"),
                 str(root / "gt"), "--format", "json", "--jobs", str(jobs)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return time.perf_counter() - t0, json.loads(proc.stdout)

        t1, s1 = run(1)
        t2, s2 = run(2)
        same = s1["dataset"] == s2["dataset"] and s1["classes"] == s2["classes"]
        print(f"np.load all: {t_load:6.2f} s")
        print(f"--jobs 1:    {t1:6.2f} s = {t1 / t_load:5.2f}x load")
        print(
            f"--jobs 2:    {t2:6.2f} s = {t2 / t_load:5.2f}x load; jobs 1 / jobs 2 = "
            f"{t1 / t2:4.2f}x; results identical: {same}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
