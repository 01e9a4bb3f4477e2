"""Start-up cost: ``klseg --help`` and ``klseg evaluate`` of one small pair (the first
sample map, 96×128×5) against ``python -c "import typer, rich"``.

    python benchmarks/bench_startup.py [--runs 20]

Medians of wall-clock times of whole processes, measured alternately in one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    base_cmd = [sys.executable, "-c", "import typer, rich"]
    help_cmd = [sys.executable, "-m", "klseg_cli", "--help"]
    eval_help = [sys.executable, "-m", "klseg_cli", "evaluate", "--help"]
    sample = Path(__file__).resolve().parent.parent / "sample_data"
    one_pair = [sys.executable, "-m", "klseg_cli", "evaluate",
                str(sample / "predictions" / "scene_00.npy"),
                str(sample / "ground_truth" / "scene_00.png")]  # fmt: skip
    for cmd in (base_cmd, help_cmd, one_pair):  # warm the file cache
        wall(cmd)
    base, klseg, sub, pair = [], [], [], []
    for _ in range(args.runs):
        base.append(wall(base_cmd))
        klseg.append(wall(help_cmd))
        sub.append(wall(eval_help))
        pair.append(wall(one_pair))
    b, k, s, e = (statistics.median(x) for x in (base, klseg, sub, pair))
    print(f"import typer, rich:       {b * 1e3:6.1f} ms")
    print(f"klseg --help:             {k * 1e3:6.1f} ms = {k / b:4.2f}x")
    print(f"klseg evaluate --help:    {s * 1e3:6.1f} ms = {s / b:4.2f}x")
    print(f"klseg evaluate one pair:  {e * 1e3:6.1f} ms = {e / b:4.2f}x")


if __name__ == "__main__":
    main()
