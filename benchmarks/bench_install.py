"""The first large map after a fresh install: is the kernel compiled already?

    python benchmarks/bench_install.py [--keep VENV]

Makes a new virtual environment, ``pip install .`` into it (as README command 1 does; the
build compiles the numba kernel into the package, see setup.py), then times, as whole
processes, ``klseg evaluate`` of one Cityscapes-sized map (1024×2048×19 float32 .npy) three
times: the first run is the one a CI job pays. Also reports whether the kernel cache
shipped with the package was used (no new cache files written) and the install time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="make the venv here and keep it")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="klseg-install-"))
    venv = args.keep or work / "venv"
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([venv / "bin" / "pip", "install", "-q", str(ROOT)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        t_install = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        z = rng.standard_normal((1024, 2048, 19), dtype=np.float32) * 3
        z -= z.max(axis=2, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=2, keepdims=True)
        np.save(work / "map.npy", z)
        Image.fromarray(z.argmax(axis=2).astype(np.uint8)).save(work / "map.png")
        site = next((venv / "lib").glob("python*/site-packages/klseg_cli"))
        cache = site / "core" / "_numba_cache"
        before = sorted(p.name for p in cache.glob("*")) if cache.exists() else []
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([venv / "bin" / "klseg", "evaluate", work / "map.npy",
                            work / "map.png"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            times.append(time.perf_counter() - t0)
        after = sorted(p.name for p in cache.glob("*")) if cache.exists() else []
        print(f"pip install . into a new venv: {t_install:.1f} s")
        print(
            f"kernel cache shipped: {len(before)} files; after the runs: {len(after)} "
            f"({'used as shipped' if before and before == after else 'compiled at run time'})"
        )
        print("klseg evaluate of one 1024x2048x19 map: "
              + ", ".join(f"{t:.2f} s" for t in times) + " (first run first)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
