"""Multi-rater references for the commands: ``evaluate --rater`` and ``heatmap --rater``.

``evaluate PRED --rater A --rater B [--samples S ...]`` replaces the GT argument by two or
more rater folders (engine/raters.py); ``heatmap PRED --rater A --rater B --metric
rater-disagreement`` draws where the raters disagree: 1 − max_c q_c, the share of a
pixel's raters who did not give its most frequent label (docs/design/multi-rater.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.raters import class_counts, dataset_names, disagreement
from ..errors import UsageError

RATER_NAMES = frozenset(dataset_names())


def check_no_rater_names(texts: Sequence[str]) -> None:
    """A usage error, before any work, for a requirement on a multi-rater score without
    --rater (those scores exist only against raters)."""
    from .requirements import parse_requirement

    for req in map(parse_requirement, texts):
        if req.klass is None and req.metric in RATER_NAMES:
            raise UsageError(
                f"--require {req.text!r}: {req.metric} is computed against raters; pass "
                "--rater DIR at least twice instead of GT"
            )


def rater_run(gt, raters: Sequence[str] | None, samples: Sequence[str] | None, reqs, *,
              scheduler=None, heatmaps: int = 0):  # fmt: skip
    """The evaluation function of ``evaluate --rater``: ``run(pred, None, **options)``,
    after the checks that the command line fits together."""
    if not raters:
        raise UsageError("--samples needs --rater: the samples are compared with the raters")
    if gt is not None:
        raise UsageError(
            f"pass GT or --rater folders, not both (got GT {gt} and {len(raters)} --rater)"
        )
    if len(raters) < 2:
        raise UsageError(
            f"--rater needs at least two rater folders (got {len(raters)}); give --rater once "
            "per rater, or pass one target as GT"
        )
    if heatmaps:
        raise UsageError(
            "--heatmaps draws KL against one target; with --rater draw maps with "
            "klseg heatmap PRED --rater DIR --rater DIR --metric rater-disagreement"
        )
    from ..engine.raters import dask_evaluate_raters, evaluate_raters

    def run(pred, _gt, **options):
        if scheduler:
            options["scheduler"] = scheduler
            return dask_evaluate_raters(pred, list(raters), samples=list(samples or ()),
                                        **options)  # fmt: skip
        return evaluate_raters(pred, list(raters), samples=list(samples or ()), **options)

    return run


def _class_codes(raw: np.ndarray) -> np.ndarray:
    """The majority map holds class codes already (−1: no rater labels the pixel)."""
    return raw


def rater_map(pred_map, masks, settings, *, with_pred: bool = False, chunk_pixels: int):
    """The rater-disagreement MetricMap of one image (NaN where no rater labels a pixel);
    with ``with_pred`` (``--panel``) the prediction's argmax and, as the target panel, the
    raters' most frequent label (ties to the lowest class, as argmax q everywhere)."""
    from ..engine.local import chunk_for
    from ..render.heatmap import MetricMap, _empty, _put

    H, W = masks.shape
    values = _empty((H, W), np.float32, np.nan)
    pred = _empty((H, W), np.uint16, 0) if with_pred else None
    majority = _empty((H, W), np.int16, -1) if with_pred else None
    step = chunk_for(chunk_pixels, settings.num_classes)
    logits = settings.input_kind == "logits"
    for start in range(0, H * W, step):
        stop = min(start + step, H * W)
        codes = masks.codes(start, stop)
        v, labelled = disagreement(codes, settings.num_classes)
        valid = None if labelled.all() else labelled
        _put(values, start, stop, v[labelled], valid, np.nan)
        if pred is not None:
            _put(pred, start, stop, np.argmax(pred_map.block(start, stop, logits=logits), 0),
                 None, 0)  # fmt: skip
            top = np.argmax(class_counts(codes, settings.num_classes), axis=0)
            _put(majority, start, stop, top[labelled], valid, -1)
    return MetricMap("rater-disagreement", values, pred, majority, "", _class_codes)


def make_rater_heatmaps(
    pred: str | Path,
    raters: Sequence[str | Path],
    out: str | Path,
    options,
    *,
    raw: str | Path | None = None,
    on_start=None,
    on_image=None,
    **plan_options,
) -> list[Path]:
    """Heatmaps of where the raters disagree, for each image the prediction and the raters
    share (``out`` a .png for files, a folder for folders)."""
    from ..engine.raters import _open, plan_raters
    from ..io.raters import RaterMasks
    from ..render.heatmap import DEFAULT_IGNORE_COLOR, colormap_lut, parse_color, render_pairs

    if options.metric != "rater-disagreement":
        raise UsageError(
            f"--rater draws --metric rater-disagreement, not {options.metric!r} (KL against the "
            "raters' map: klseg evaluate PRED --rater ...)"
        )
    colormap_lut(options.cmap)
    parse_color(options.ignore_color or DEFAULT_IGNORE_COLOR)
    job = plan_raters(pred, raters, **plan_options)
    settings, read = job.settings, job.read
    pairs = job.pairing.pairs
    inputs = [p for pair in pairs for p in (pair.pred, *pair.raters)]

    def compute(pair):
        masks = RaterMasks(pair.raters, settings.labels, max_pixels=read.max_pixels)
        pm = _open(pair.pred, masks.shape, settings.num_classes, read)
        return rater_map(pm, masks, settings, with_pred=options.panel,
                         chunk_pixels=read.chunk_pixels)  # fmt: skip

    return render_pairs(pairs, Path(pred), Path(out), Path(raw) if raw is not None else None,
                        options, settings, inputs, compute, on_start=on_start,
                        on_image=on_image)  # fmt: skip


__all__ = ["check_no_rater_names", "make_rater_heatmaps", "rater_map", "rater_run"]
