"""Start-up cost: ``klseg --help`` against ``python -c "import typer, rich"``.

    python benchmarks/bench_startup.py [--runs 20]

Medians of wall-clock times of whole processes, measured alternately in one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


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
    for cmd in (base_cmd, help_cmd):  # warm the file cache
        wall(cmd)
    base, klseg, sub = [], [], []
    for _ in range(args.runs):
        base.append(wall(base_cmd))
        klseg.append(wall(help_cmd))
        sub.append(wall(eval_help))
    b, k, s = (statistics.median(x) for x in (base, klseg, sub))
    print(f"import typer, rich:    {b * 1e3:6.1f} ms")
    print(f"klseg --help:          {k * 1e3:6.1f} ms = {k / b:4.2f}x")
    print(f"klseg evaluate --help: {s * 1e3:6.1f} ms = {s / b:4.2f}x")


if __name__ == "__main__":
    main()
