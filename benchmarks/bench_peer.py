"""klseg's core against torchmetrics on the CPU, computing the same quantities.

    python benchmarks/bench_peer.py [--height 1024 --width 2048 --classes 19]

torchmetrics: MulticlassJaccardIndex (per-class IoU) + MulticlassCalibrationError (top-label
ECE, 15 bins) + NLL (the cross-entropy of hard labels, = KL here), updated on the same
float32 (C, H, W) map. klseg: the core with all its default metrics (which is more work).
Both single-threaded, both on data already in memory; ratios are from this one run.
Skips cleanly (exit 0) when torch or torchmetrics is not installed: neither is a klseg
dependency.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        import torch
        import torchmetrics.classification as tmc
    except ImportError as err:
        print(f"skipped: {err.name} is not installed (pip install torch torchmetrics)")
        return
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_core import best_of, make_map

    from klseg_cli.core import _fast
    from klseg_cli.core.metrics import MetricSettings
    from klseg_cli.core.stats import class_metrics, ece
    from klseg_cli.engine.image import image_stats
    from klseg_cli.io.readers import PredictionMap

    torch.set_num_threads(1)
    h, w, C = args.height, args.width, args.classes
    p_hwc, labels = make_map(h, w, C, np.random.default_rng(0))
    p_chw = np.ascontiguousarray(p_hwc.transpose(2, 0, 1))
    settings = MetricSettings(num_classes=C)

    preds = torch.from_numpy(p_chw)[None]  # (1, C, H, W) probabilities
    target = torch.from_numpy(labels.astype(np.int64))[None]

    def torchmetrics_run():
        iou = tmc.MulticlassJaccardIndex(num_classes=C, average=None, ignore_index=255)
        cal = tmc.MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1",
                                             ignore_index=255)  # fmt: skip
        iou.update(preds, target)
        cal.update(preds, target)
        logp = torch.log(preds.clamp_min(1e-7))
        nll = torch.nn.functional.nll_loss(logp, target, ignore_index=255)
        return iou.compute(), cal.compute(), nll

    t_sum = best_of(lambda: np.sum(p_chw), 3 * args.repeat)
    t_tm = best_of(torchmetrics_run, args.repeat)
    pm = PredictionMap("bench", p_chw, "chw")
    t_np = best_of(lambda: image_stats(pm, labels, settings, accelerate=False), args.repeat)
    print(f"map {h}x{w}x{C} float32, CHW, single thread, best of {args.repeat}")
    print(f"np.sum pass        {t_sum * 1e3:8.1f} ms")
    print(f"torchmetrics       {t_tm * 1e3:8.1f} ms = {t_tm / t_sum:6.1f}x sum")
    print(f"klseg (NumPy)      {t_np * 1e3:8.1f} ms = {t_np / t_sum:6.1f}x sum; "
          f"{t_tm / t_np:5.1f}x faster than torchmetrics")  # fmt: skip
    if _fast.AVAILABLE:
        image_stats(pm, labels, settings, accelerate=True)
        t_fast = best_of(lambda: image_stats(pm, labels, settings, accelerate=True), args.repeat)
        print(f"klseg (numba)      {t_fast * 1e3:8.1f} ms = {t_fast / t_sum:6.1f}x sum; "
              f"{t_tm / t_fast:5.1f}x faster than torchmetrics")  # fmt: skip
    # the same numbers, so the race is fair
    iou, cal, nll = torchmetrics_run()
    stats = image_stats(pm, labels, settings, accelerate=False)
    ours_iou = np.array([r["iou"] for r in class_metrics(stats, settings)])
    print(
        f"check: max |IoU diff| {np.nanmax(np.abs(ours_iou - iou.numpy())):.2e}, "
        f"ECE {ece(stats):.6f} vs {float(cal):.6f}, "
        f"NLL {stats.sums[3] / stats.n_valid:.6f} vs {float(nll):.6f}"
    )


if __name__ == "__main__":
    main()
