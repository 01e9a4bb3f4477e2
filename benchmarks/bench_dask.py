"""Dask overheads: a folder on 2 local Dask workers vs --jobs 2, and one big Zarr map split
across 2 workers vs one process.

    python benchmarks/bench_dask.py [--n 12 --height 512 --width 1024 --classes 19]
                                    [--big 4096 --big-classes 4]

Folder: N float32 (H, W, C) .npy maps and PNG targets; ``klseg_cli.evaluate(jobs=2)`` in
this process vs ``dask_evaluate`` on a LocalCluster of 2 worker processes (one thread
each) started beforehand (its start-up is printed apart, as ``--scheduler local:2`` pays
it on every run and a real cluster does not). Big map: one (C, S, S) float32 Zarr map in
(C, 512, 512) chunks with a Zarr label mask; ``evaluate(jobs=1)`` vs the map split into
row blocks on the same 2 workers. Each timing is the best of ``--repeat`` runs; the results
are checked to agree (folder: to the last digit).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def softmax(rng, shape, axis):
    z = rng.standard_normal(shape, dtype=np.float32) * 3
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--big", type=int, default=4096)
    ap.add_argument("--big-classes", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import distributed
    import zarr

    import klseg_cli
    from klseg_cli.engine.dask_cluster import dask_evaluate

    root = Path(tempfile.mkdtemp(prefix="klseg-dask-"))
    try:
        rng = np.random.default_rng(0)
        h, w, C = args.height, args.width, args.classes
        (root / "pred").mkdir()
        (root / "gt").mkdir()
        for i in range(args.n):
            p = softmax(rng, (h, w, C), 2)
            np.save(root / "pred" / f"img{i:03d}.npy", p)
            Image.fromarray(p.argmax(axis=2).astype(np.uint8)).save(root / "gt" / f"img{i:03d}.png")
        S, K = args.big, args.big_classes
        big = root / "big"
        (big / "p").mkdir(parents=True)
        (big / "y").mkdir()
        zp = zarr.create_array(str(big / "p" / "slide.zarr"), shape=(K, S, S),
                               chunks=(K, 512, 512), dtype="f4")  # fmt: skip
        zy = zarr.create_array(str(big / "y" / "slide.zarr"), shape=(S, S), chunks=(512, 512),
                               dtype="u1")  # fmt: skip
        for r0 in range(0, S, 512):
            block = softmax(rng, (K, min(512, S - r0), S), 0)
            zp[:, r0 : r0 + block.shape[1]] = block
            zy[r0 : r0 + block.shape[1]] = block.argmax(axis=0).astype(np.uint8)

        t0 = time.perf_counter()
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, host="127.0.0.1")  # fmt: skip
        startup = time.perf_counter() - t0
        address = cluster.scheduler_address
        try:
            folder = (str(root / "pred"), str(root / "gt"))
            t_jobs2, local = best(lambda: klseg_cli.evaluate(*folder, jobs=2), args.repeat)
            t_dask, remote = best(lambda: dask_evaluate(*folder, scheduler=address), args.repeat)
            assert remote.summary()["dataset"] == local.summary()["dataset"] or all(
                a == b or (a != a and b != b)
                for a, b in zip(remote.summary()["dataset"].values(),
                                local.summary()["dataset"].values())
            )  # fmt: skip
            gb = args.n * h * w * C * 4 / 1e9
            print(f"folder: {args.n} maps {h}x{w}x{C} float32 ({gb:.2f} GB)")
            print(f"  evaluate --jobs 2            {t_jobs2:6.2f} s")
            ratio = t_dask / t_jobs2
            print(f"  2 Dask workers (local)       {t_dask:6.2f} s   ratio {ratio:.2f}")
            print(f"  LocalCluster(2) start-up     {startup:6.2f} s   (each --scheduler local:2)")
            big_args = (str(big / "p" / "slide.zarr"), str(big / "y" / "slide.zarr"))
            t_one, one = best(lambda: klseg_cli.evaluate(*big_args, jobs=1), args.repeat)
            t_split, split = best(
                lambda: dask_evaluate(*big_args, scheduler=address, block_rows=512), args.repeat
            )
            assert split.total.n_valid == one.total.n_valid
            assert np.array_equal(split.total.confusion, one.total.confusion)
            gb = K * S * S * 4 / 1e9
            print(f"big Zarr map: ({K}, {S}, {S}) float32 ({gb:.2f} GB), chunks (K, 512, 512)")
            print(f"  one process (jobs 1)         {t_one:6.2f} s")
            gain = t_one / t_split
            print(f"  split over 2 Dask workers    {t_split:6.2f} s   speed-up {gain:.2f}x"
                  f"  ({-(-S // 512)} row blocks)")  # fmt: skip
        finally:
            cluster.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
