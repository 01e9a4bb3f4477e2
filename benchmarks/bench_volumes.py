"""Volumes and boundary metrics: what ``--boundary`` costs on top of ``evaluate``.

    python benchmarks/bench_volumes.py [N_VOLUMES] [X,Y,Z] [FOLDER] [JOBS] [NOISE]

Writes N_VOLUMES (default 10) synthetic NIfTI pairs of 256×256×128 voxels (spacing
0.8 × 0.8 × 2.5 mm) with 4 classes into FOLDER (default a temporary folder, removed after):
float32 probability maps (X, Y, Z, 4), uncompressed ``.nii`` (memory-mapped), and uint8
label volumes holding a background and three ellipsoid "organs" of different sizes; the
prediction's organs are shifted and resized by a few voxels, and its logits get Gaussian
noise of standard deviation NOISE (default 0.5: a smooth argmax, as a trained model's; 1.0
flips about 0.7% of the voxels to scattered single-voxel islands, the worst case for
boundary metrics: surfaces everywhere).
Then times, one after the other (never in parallel), ``klseg evaluate`` without and with
``--boundary`` (all classes; and with ``--exclude-class 0``, the background left out as
medical reports do), and prints each wall time, peak RSS of the klseg process and the ratio.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPACING = (0.8, 0.8, 2.5)
ORGANS = (  # centre (fraction of the shape), radii (mm)
    ((0.45, 0.50, 0.50), (70.0, 55.0, 120.0)),
    ((0.65, 0.35, 0.45), (25.0, 30.0, 60.0)),
    ((0.30, 0.70, 0.55), (12.0, 12.0, 30.0)),
)


def _organs(shape, rng, jitter: float) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    for k, (centre, radii) in enumerate(ORGANS, start=1):
        c = [f * n + jitter * rng.normal() for f, n in zip(centre, shape)]
        r = [max(2.0, ri * (1 + 0.05 * jitter * rng.normal())) for ri in radii]
        inside = sum((((g - ci) * s) / ri) ** 2 for g, ci, s, ri in zip(grids, c, SPACING, r))
        labels[inside <= 1.0] = k
    return labels


def write_volumes(folder: Path, n: int, shape, noise: float) -> None:
    import nibabel as nib

    (folder / "pred").mkdir(parents=True)
    (folder / "gt").mkdir()
    affine = np.diag([*SPACING, 1.0])
    for i in range(n):
        rng = np.random.default_rng(i)
        target = _organs(shape, rng, jitter=0.0)
        predicted = _organs(shape, rng, jitter=2.0)
        probs = np.empty((*shape, 4), dtype=np.float32)
        for z in range(shape[2]):  # slab by slab: bounded memory while writing
            logits = rng.normal(0, noise, size=(shape[0], shape[1], 4)).astype(np.float32)
            logits[np.arange(shape[0])[:, None], np.arange(shape[1]), predicted[:, :, z]] += 4.0
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs[:, :, z] = e / e.sum(axis=-1, keepdims=True)
        nib.save(nib.Nifti1Image(probs, affine), folder / "pred" / f"case_{i:03d}.nii")
        nib.save(nib.Nifti1Image(target, affine), folder / "gt" / f"case_{i:03d}.nii")


def run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one klseg run (its own rusage, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "klseg_cli", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"klseg {' '.join(args)} exited with {proc.returncode}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    shape = tuple(int(v) for v in sys.argv[2].split(",")) if len(sys.argv) > 2 else (256, 256, 128)
    keep = len(sys.argv) > 3
    folder = Path(sys.argv[3]) if keep else Path(tempfile.mkdtemp(prefix="klseg_vol_"))
    jobs = sys.argv[4] if len(sys.argv) > 4 else "1"
    noise = float(sys.argv[5]) if len(sys.argv) > 5 else 0.5
    try:
        if not (folder / "pred").exists():
            t0 = time.perf_counter()
            write_volumes(folder, n, shape, noise)
            print(f"wrote {n} volumes {shape} × 4 classes in {time.perf_counter() - t0:.1f} s")
        base = ["evaluate", str(folder / "pred"), str(folder / "gt"), "--jobs", jobs]
        runs = {
            "without --boundary": base,
            "--boundary": [*base, "--boundary"],
            "--boundary --exclude-class 0": [*base, "--boundary", "--exclude-class", "0"],
        }
        times = {}
        for name, args in runs.items():
            wall, rss = run(args)
            times[name] = wall
            print(f"{name:32s} {wall:7.1f} s   peak RSS {rss:6.0f} MiB")
        plain = times["without --boundary"]
        for name in list(runs)[1:]:
            print(f"ratio {name} / without: {times[name] / plain:.2f}")
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
