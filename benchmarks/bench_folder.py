"""Folder throughput: klseg evaluate on N Cityscapes-sized maps vs. just loading them.

    python benchmarks/bench_folder.py [--n 24] [--height 1024 --width 2048 --classes 19]

Writes N float32 (H, W, C) .npy maps and uint8 PNG targets into a temporary folder, then
measures in one run, each time right after reading every file once (the page cache on
these machines is trimmed within seconds, so "warm" has to be renewed):
  - ``np.load`` of every map (the floor), before and after the klseg runs;
  - a plain Python process that ``np.load``s and sums every map (start-up included: the
    command klseg evaluate is compared with);
  - ``klseg evaluate`` as a command with --jobs 1 and --jobs 2 (start-up included);
  - ``klseg_cli.evaluate`` in one warm process with jobs=1 and jobs=2 (start-up excluded:
    the throughput of the work itself).
  - ``klseg_cli.evaluate`` with jobs=1 and the read-ahead thread forced on and off (off:
    reading and computing in turn, what ``--jobs 1`` did before the read-ahead).
Prints the ratios evaluate/load and jobs1/jobs2, and checks that all runs agree.
``--repeat N`` runs the whole set N times, interleaved, and reports each one's minimum: on a
machine shared with other work, the minimum is the least disturbed run.
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
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; minimum kept")
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

        def warm():
            for f in files + sorted((root / "gt").glob("*.png")):
                f.read_bytes()

        def timed(fn):
            warm()
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out

        def plain_process():
            code = "import sys, numpy as np\nfor f in sys.argv[1:]: np.load(f).sum()"
            subprocess.run([sys.executable, "-c", code, *map(str, files)], check=True)

        def command(jobs):
            proc = subprocess.run(
                [sys.executable, "-m", "klseg_cli", "evaluate", str(root / "pred"),
                 str(root / "gt"), "--format", "json", "--jobs", str(jobs)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return json.loads(proc.stdout)

        from klseg_cli import evaluate

        def in_process(jobs):
            return evaluate(root / "pred", root / "gt", jobs=jobs).summary()

        from klseg_cli.engine import local

        def read_ahead(on: bool):
            """jobs=1 with the read-ahead thread forced on or off (by default it is on only
            while a second core is idle: ``local.idle_core``)."""
            idle = getattr(local, "idle_core", None)
            local.idle_core = lambda: on
            try:
                return in_process(1)
            finally:
                if idle is not None:
                    local.idle_core = idle

        in_process(1)  # load the kernel once
        best: dict[str, float] = {}

        def run(name, fn):
            t, out = timed(fn)
            best[name] = min(best.get(name, t), t)
            return out

        for _ in range(args.repeat):
            run("load", load_all)
            run("plain", plain_process)
            s1 = run("t1", lambda: command(1))
            s2 = run("t2", lambda: command(2))
            r1 = run("p1", lambda: read_ahead(True))
            r0 = run("p0", lambda: read_ahead(False))
            r2 = run("p2", lambda: in_process(2))
            run("load2", load_all)
        t_load, t_plain, t1, t2 = best["load"], best["plain"], best["t1"], best["t2"]
        p1, p0, p2, t_load2 = best["p1"], best["p0"], best["p2"], best["load2"]
        if args.repeat > 1:
            print(f"minimum of {args.repeat} interleaved rounds")

        def numbers(summary):  # NaN (in process) and null (JSON) both mean "undefined"
            text = json.dumps([summary["dataset"], summary["classes"]])
            return json.loads(text.replace("NaN", "null"))

        same = all(numbers(s) == numbers(s1) for s in (s2, r1, r0, r2))
        floor = min(t_load, t_load2)
        print(f"np.load all: {t_load:6.2f} s before, {t_load2:.2f} s after (floor {floor:.2f} s)")
        print(f"python -c 'np.load(f).sum()' of every file: {t_plain:6.2f} s")
        print(f"command --jobs 1: {t1:6.2f} s = {t1 / floor:5.2f}x load, "
              f"{t1 / t_plain:5.2f}x the load-and-sum process")  # fmt: skip
        print(f"command --jobs 2: {t2:6.2f} s = {t2 / floor:5.2f}x load; jobs 1 / jobs 2 = "
              f"{t1 / t2:4.2f}x")  # fmt: skip
        print(f"in process, jobs=1, no read-ahead: {p0:6.2f} s = {p0 / floor:5.2f}x load")
        print(f"in process, jobs=1, read-ahead: {p1:6.2f} s = {p1 / floor:5.2f}x load; it saves "
              f"{p0 - p1:.2f} s ({p0 / p1:4.2f}x)")  # fmt: skip
        print(f"in process, jobs=2: {p2:6.2f} s = {p2 / floor:5.2f}x load; jobs 1 / jobs 2 = "
              f"{p1 / p2:4.2f}x")  # fmt: skip
        print(f"start-up of the command (imports, kernel load): ~{t1 - p1:.2f} s")
        print(f"results identical across all runs: {same}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
