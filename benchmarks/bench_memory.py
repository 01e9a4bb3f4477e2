"""Peak memory of klseg on maps far larger than a chunk (a script, not a test).

    python benchmarks/bench_memory.py [--gb 4] [--keep]
    python benchmarks/bench_memory.py --targets [--sides 16384 32768] [--classes 4]
    python benchmarks/bench_memory.py --raters 3 [--sides 8192 12288] [--classes 4]


Writes a ~4 GB float32 (H, W, 19) .npy prediction and a uint8 .npy target into a temporary
folder, then runs ``klseg evaluate`` and ``klseg heatmap`` on it as child processes and
reports each one's peak resident set size as the OS accounts it (``ru_maxrss`` of the
child, the number ``/usr/bin/time -v`` prints as "Maximum resident set size"). Then it
evaluates folders of 2 and 8 images (links to one file) to show RSS does not grow with the
number of images.

``--targets``: for each side S, a (S, S, 4) float32 ``.npy`` map (S = 16384: 4.3 GB,
S = 32768: 17 GB) with a uint8 target as ``.npy``, uncompressed TIFF, zlib-tiled TIFF and
(when zarr is installed) Zarr, and ``klseg evaluate`` on each pair with the default flags:
peak RSS must not grow with S. Each map is deleted before the next is written.

``--raters R``: the same maps with R uint8 ``.npy`` rater masks (each a shifted copy of the
target) and ``klseg evaluate PRED --rater ... --rater ...``: the rater masks are read in
row bands as a single target is, so peak RSS must not grow with S either.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

C = 19


def write_map(folder: Path, gb: float) -> tuple[Path, Path]:
    side = int(math.sqrt(gb * 1e9 / (4 * C)))
    h, w = side, side
    pred = folder / "pred" / "big.npy"
    gt = folder / "gt" / "big.npy"
    pred.parent.mkdir()
    gt.parent.mkdir()
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(pred, mode="w+", dtype=np.float32, shape=(h, w, C))
    labels = np.lib.format.open_memmap(gt, mode="w+", dtype=np.uint8, shape=(h, w))
    rows = max(1, (1 << 22) // (w * C))
    for r in range(0, h, rows):
        z = rng.standard_normal((min(rows, h - r), w, C), dtype=np.float32) * 3
        z -= z.max(axis=2, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=2, keepdims=True)
        mm[r : r + rows] = z
        labels[r : r + rows] = z.argmax(axis=2)
    mm.flush()
    labels.flush()
    del mm, labels
    return pred, gt


def write_tiled_tiff(folder: Path, gb: float) -> tuple[Path, Path]:
    """A (19, S, S) float32 tiled BigTIFF of about ``gb`` GB, one page per class."""
    import tifffile

    side = int(math.sqrt(gb * 1e9 / (4 * C))) // 256 * 256
    pred = folder / "tiled" / "big.tif"
    gt = folder / "tiled_gt" / "big.npy"
    pred.parent.mkdir()
    gt.parent.mkdir()
    rng = np.random.default_rng(1)
    np.save(gt, rng.integers(0, C, size=(side, side), dtype=np.uint8))
    tile = np.full((256, 256), 1.0 / C, dtype=np.float32)  # uniform: valid, cheap to make
    n_tiles = C * (side // 256) ** 2
    tifffile.imwrite(
        pred,
        data=(tile for _ in range(n_tiles)),
        shape=(C, side, side),
        dtype=np.float32,
        tile=(256, 256),
        photometric="minisblack",
        bigtiff=True,
    )
    return pred, gt


def write_target_pair(folder: Path, side: int, classes: int) -> dict[str, Path]:
    """A (side, side, classes) float32 .npy map of uniform probabilities and its uint8
    target in every banded format, written band by band (never whole in memory)."""
    import tifffile

    pred = folder / "pred.npy"
    band = max(1, (1 << 24) // (side * classes))
    probs = np.full((band, side, classes), 1.0 / classes, dtype=np.float32)
    header = {"descr": "<f4", "fortran_order": False, "shape": (side, side, classes)}
    with open(pred, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, header)
        for r in range(0, side, band):
            fh.write(probs[: min(band, side - r)].tobytes())
    rows = np.arange(side, dtype=np.int64)
    gt = folder / "gt.npy"
    labels = np.lib.format.open_memmap(gt, mode="w+", dtype=np.uint8, shape=(side, side))
    for r in range(0, side, 1024):
        labels[r : r + 1024] = ((rows[r : r + 1024, None] + rows[None, :]) % classes).astype(
            np.uint8
        )
    labels.flush()
    targets = {"npy": gt}

    def bands(rows=1024):
        for r in range(0, side, rows):
            yield np.asarray(labels[r : r + rows])

    tiled = {"tile": (512, 512), "compression": "zlib"}
    for name, kw in (("tiff", {}), ("tiff-tiled-zlib", tiled)):
        out = folder / f"gt-{name}.tif"
        if "tile" in kw:
            tifffile.imwrite(out, shape=(side, side), dtype=np.uint8, bigtiff=True, **kw,
                             data=(t for b in bands(512) for t in _tiles(b, 512)))  # fmt: skip
        else:
            tifffile.imwrite(out, shape=(side, side), dtype=np.uint8, bigtiff=True,
                             rowsperstrip=1024, data=bands())  # fmt: skip
        targets[name] = out
    try:
        import zarr

        z = zarr.create_array(folder / "gt.zarr", shape=(side, side), chunks=(1024, 1024),
                              dtype=np.uint8)  # fmt: skip
        for r in range(0, side, 1024):
            z[r : r + 1024] = np.asarray(labels[r : r + 1024])
        targets["zarr"] = folder / "gt.zarr"
    except ImportError:
        pass
    return {"pred": pred, **targets}


def _tiles(band: np.ndarray, t: int):
    for c in range(0, band.shape[1], t):
        yield band[:, c : c + t]


def targets_benchmark(sides: list[int], classes: int) -> None:
    """Peak RSS of ``klseg evaluate`` (default flags) for each target format and map size."""
    for side in sides:
        folder = Path(tempfile.mkdtemp(prefix="klseg-mem-"))
        try:
            t0 = time.perf_counter()
            write = [sys.executable, __file__, "--write-targets", str(folder)]
            subprocess.run([*write, "--sides", str(side), "--classes", str(classes)], check=True)
            pred = folder / "pred.npy"
            size = pred.stat().st_size / 1e9
            print(f"wrote {side}x{side}x{classes} map ({size:.1f} GB) and its targets in "
                  f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
            for name, gt in sorted(
                (p.name, p) for p in folder.iterdir() if p.name.startswith("gt")
            ):
                rss, dt = peak_rss_mb(["evaluate", str(pred), str(gt), "--format", "json"])
                print(f"  evaluate {size:5.1f} GB map, target {name:22s}: peak RSS "
                      f"{rss:6.0f} MB ({dt:.0f} s)", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def raters_benchmark(sides: list[int], classes: int, n_raters: int) -> None:
    """Peak RSS of ``klseg evaluate --rater`` (R .npy masks) for each map size."""
    for side in sides:
        folder = Path(tempfile.mkdtemp(prefix="klseg-mem-"))
        try:
            t0 = time.perf_counter()
            write = [sys.executable, __file__, "--write-targets", str(folder)]
            subprocess.run([*write, "--sides", str(side), "--classes", str(classes)], check=True)
            for name in ("gt-tiff.tif", "gt-tiff-tiled-zlib.tif"):
                (folder / name).unlink(missing_ok=True)
            shutil.rmtree(folder / "gt.zarr", ignore_errors=True)
            labels = np.load(folder / "gt.npy", mmap_mode="r")
            raters = []
            for r in range(n_raters):
                out = folder / f"rater{r}" / "pred.npy"
                out.parent.mkdir()
                mask = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8,
                                                 shape=labels.shape)  # fmt: skip
                for r0 in range(0, side, 1024):  # rater r draws every boundary r px later
                    mask[r0 : r0 + 1024] = np.roll(labels[r0 : r0 + 1024], r, axis=1)
                mask.flush()
                del mask
                raters += ["--rater", str(out)]
            del labels
            pred = folder / "pred.npy"
            size = pred.stat().st_size / 1e9
            print(f"wrote {side}x{side}x{classes} map ({size:.1f} GB) and {n_raters} rater "
                  f"masks in {time.perf_counter() - t0:.0f} s")  # fmt: skip
            rss, dt = peak_rss_mb(["evaluate", str(pred), *raters, "--format", "json"])
            print(f"  evaluate --rater x{n_raters} {size:5.1f} GB map: peak RSS {rss:6.0f} MB "
                  f"({dt:.0f} s)", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """Run ``klseg ARGS``; (its peak RSS in MB, seconds) as the OS accounts it.

    Through ``/usr/bin/time -f %M`` where it exists: a child forked straight from this
    (larger) process would count this process's resident pages in its own peak.
    """
    cmd = [sys.executable, "-m", "klseg_cli", *args]
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    t0 = time.perf_counter()
    if timer:
        proc = subprocess.run([timer, "-f", "%M", *cmd], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode not in (0, 1):
            sys.exit(f"klseg {' '.join(args)} failed:\n{proc.stderr}")
        return int(proc.stderr.strip().splitlines()[-1]) / 1024, dt
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(p.pid, 0)
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--targets", action="store_true", help="target formats × map sizes")
    ap.add_argument("--sides", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--write-targets", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--raters", type=int, default=0, help="evaluate --rater with R masks")
    args = ap.parse_args()
    if args.write_targets:
        write_target_pair(args.write_targets, args.sides[0], args.classes)
        return
    if args.targets:
        targets_benchmark(args.sides, args.classes)
        return
    if args.raters:
        raters_benchmark(args.sides, args.classes, args.raters)
        return
    if args.write:
        write_map(args.write, args.gb)
        write_tiled_tiff(args.write, args.gb / 2)
        return
    folder = Path(tempfile.mkdtemp(prefix="klseg-mem-"))
    try:
        t0 = time.perf_counter()
        # written by a child, so that this process stays small: a child forked from a large
        # parent starts with the parent's resident pages and would report them as its peak
        subprocess.run(
            [sys.executable, __file__, "--write", str(folder), "--gb", str(args.gb)], check=True
        )
        pred, gt = folder / "pred" / "big.npy", folder / "gt" / "big.npy"
        size = pred.stat().st_size / 1e9
        print(f"wrote {pred} ({size:.2f} GB) in {time.perf_counter() - t0:.0f} s")
        for n in (8, 2):
            d = folder / f"set{n}"
            (d / "pred").mkdir(parents=True)
            (d / "gt").mkdir()
            small_p = folder / "small_pred.npy"
            small_g = folder / "small_gt.npy"
            if not small_p.exists():
                np.save(small_p, np.array(np.load(pred, mmap_mode="r")[:512, :1024]))
                np.save(small_g, np.array(np.load(gt, mmap_mode="r")[:512, :1024]))
            for i in range(n):
                os.symlink(small_p, d / "pred" / f"img{i}.npy")
                os.symlink(small_g, d / "gt" / f"img{i}.npy")
        for n in (8, 2):
            d = folder / f"set{n}"
            rss, dt = peak_rss_mb(["evaluate", str(d / "pred"), str(d / "gt"), "--format", "json"])
            print(f"evaluate {n} images of 512x1024x19: peak RSS {rss:6.0f} MB ({dt:.1f} s)")
        rss, dt = peak_rss_mb(["evaluate", str(pred), str(gt), "--format", "json"])
        print(f"evaluate {size:.1f} GB map: peak RSS {rss:6.0f} MB ({dt:.1f} s)")
        rss, dt = peak_rss_mb(
            ["heatmap", str(pred), str(gt), "-o", str(folder / "big.png"), "--max-side", "2048"]
        )
        print(f"heatmap  {size:.1f} GB map: peak RSS {rss:6.0f} MB ({dt:.1f} s)")
        tif, tif_gt = folder / "tiled" / "big.tif", folder / "tiled_gt" / "big.npy"
        tsize = tif.stat().st_size / 1e9
        rss, dt = peak_rss_mb(["evaluate", str(tif), str(tif_gt), "--format", "json"])
        print(f"evaluate {tsize:.1f} GB tiled BigTIFF: peak RSS {rss:6.0f} MB ({dt:.1f} s)")
        rss, dt = peak_rss_mb(
            ["heatmap", str(tif), str(tif_gt), "-o", str(folder / "t.png"), "--max-side", "2048"]
        )
        print(f"heatmap  {tsize:.1f} GB tiled BigTIFF: peak RSS {rss:6.0f} MB ({dt:.1f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
