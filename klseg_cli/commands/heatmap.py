"""``klseg heatmap``: the per-pixel maps of one pair or of folders, drawn on one colour scale
per folder, with ``--raw`` TIFFs beside, never over an input; and the worst images of an
evaluation (``evaluate --heatmaps``). Maps are ``engine/maps``'s, drawing ``render/heatmap``'s."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.metrics import MetricSettings
from ..engine.maps import FIXED_RANGE, IN_MEMORY_PIXELS, TARGET_FREE_METRICS, MetricMap, pair_map
from ..errors import InputError, UsageError
from ..io.readers import PredictionMap
from ..render.heatmap import (
    DEFAULT_IGNORE_COLOR,
    HeatmapOptions,
    LogHistogram,
    colormap_lut,
    parse_color,
    render,
    write_raw,
)
from .compare import iter_pair_chunks, open_two, pair_models

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def _photo_for(overlay: Path | None, stem: str) -> Path | None:
    """The overlay photo of one image: the file given, or the file with its stem in a folder."""
    if overlay is None or overlay.is_file():
        return overlay
    if not overlay.is_dir():
        raise InputError("no such overlay file or folder", path=overlay)
    for path in sorted(overlay.iterdir()):
        if path.suffix.lower() in PHOTO_SUFFIXES and path.stem == stem:
            return path
    raise InputError(f"no photo named {stem}.* to overlay", path=overlay)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def heatmap_outputs(pred: Path, out: Path, stems: list[str], metric: str) -> tuple[bool, list]:
    """(one file?, the PNG of each stem) for ``-o``: one pair writes ``OUT.png`` (or into a
    folder); several pairs need a folder. A non-PNG image name is refused, never made a
    folder."""
    looks_like_image = out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir()
    if looks_like_image and out.suffix.lower() != ".png":
        raise UsageError(f"-o {out}: heatmaps are PNG images; give a name ending in .png")
    if looks_like_image and (not Path(pred).is_file() or len(stems) > 1):
        raise UsageError(f"-o {out}: {len(stems)} pairs need a folder for their heatmaps")
    if looks_like_image:
        return True, [out]
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; give a folder for several heatmaps")
    return False, [out / f"{stem}_{metric}.png" for stem in stems]


def shared_scale(pairs, options: HeatmapOptions, maps: dict, compute) -> float | None:
    """The folder's one colour scale: the ``percentile`` of every valid pixel of every map
    (so images can be compared), from a mergeable log histogram. ``compute(pair)`` gives a
    pair's MetricMap; maps are kept in ``maps`` (by stem) when they fit in memory together,
    else recomputed when drawn. None when the range is given or fixed."""
    if options.vmax is not None or options.metric in FIXED_RANGE or len(pairs) < 2:
        return None
    hist, kept = LogHistogram(), 0
    for pair in pairs:
        mm = compute(pair)
        hist.add(mm.values)
        kept += mm.height * mm.width
        if kept <= IN_MEMORY_PIXELS and isinstance(mm.values, np.ndarray):
            maps[pair.stem] = mm
    vmax = hist.percentile(options.percentile)
    return vmax if math.isfinite(vmax) and vmax > 0 else None


def make_heatmaps(
    pred: str | Path,
    target: str | Path | None,
    out: str | Path,
    options: HeatmapOptions = HeatmapOptions(),
    *,
    raw: str | Path | None = None,
    on_start=None,
    on_image=None,
    **plan_options,
) -> list[Path]:
    """Render heatmaps of one pair (``out`` a .png file) or of folders (``out`` a folder).

    ``plan_options`` are those of ``evaluation.plan``. Returns the PNGs written. In folder
    mode the default colour range is one scale for every image (see ``shared_scale``).
    """
    from ..engine.local import plan

    if options.metric == "rater-disagreement":  # commands/raters.py draws it
        raise UsageError("--metric rater-disagreement needs --rater DIR at least twice, no GT")
    if target is None and options.metric not in TARGET_FREE_METRICS:
        raise UsageError(f"--metric {options.metric} needs a target (GT)")
    colormap_lut(options.cmap)  # fail on a bad name or colour before any work
    parse_color(options.ignore_color or DEFAULT_IGNORE_COLOR)
    job = plan(pred, target, **plan_options)
    out = Path(out)
    raw = Path(raw) if raw is not None else None
    pairs = job.pairing.pairs
    inputs = [p for pair in pairs for p in (pair.pred, pair.target)]

    def compute(pair) -> MetricMap:
        return pair_map(pair, job.settings, job.read, options.metric, with_pred=options.panel,
                        view=options.view)  # fmt: skip

    from ..io.zarrio import collect_missing, warn_missing

    with collect_missing() as missing:  # Zarr chunks read as the fill value: warned
        written = render_pairs(pairs, Path(pred), out, raw, options, job.settings, inputs,
                               compute, on_start=on_start, on_image=on_image)  # fmt: skip
    warn_missing(missing)
    return written


def render_pairs(pairs, first: Path, out: Path, raw: Path | None, options: HeatmapOptions,
                 settings: MetricSettings, inputs, compute, *, on_start=None,
                 on_image=None) -> list[Path]:  # fmt: skip
    """Draw ``compute(pair)`` (a MetricMap) of every pair: one ``out`` PNG when ``first``
    (the PRED argument) is a file, else ``out/<stem>_<metric>.png`` on the folder's one
    colour scale; ``--raw`` TIFFs beside; never over an input. Returns the PNGs written."""
    from dataclasses import replace

    from ..render.formats import refuse_overwriting_inputs

    single, pngs = heatmap_outputs(first, out, [p.stem for p in pairs], options.metric)
    if not single:
        out.mkdir(parents=True, exist_ok=True)
        if raw is not None:
            raw.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start(len(pairs))
    maps: dict[str, MetricMap] = {}
    vmax = shared_scale(pairs, options, maps, compute)
    written = []
    for pair, png in zip(pairs, pngs):
        tif = (
            None if raw is None else (raw if single else raw / f"{pair.stem}_{options.metric}.tif")
        )
        refuse_overwriting_inputs([png, tif], inputs)
        mm = maps.pop(pair.stem, None) or compute(pair)
        render(
            mm,
            png,
            replace(options, overlay=_photo_for(options.overlay, pair.stem)),
            class_names=settings.names,
            ignore_index=settings.ignore_index,
            shared_vmax=vmax,
        )
        if tif is not None:
            write_raw(mm, tif)
        written.append(png)
        if on_image is not None:
            on_image(pair)
    return written


def worst_images_heatmaps(result, folder: Path, k: int, options: HeatmapOptions) -> list[Path]:
    """Heatmaps of the ``k`` images of an evaluation with the highest mean KL, on one scale."""
    from ..io.pairing import Pair

    settings = result.settings
    rows = {row["image"]: row for row in result.image_rows()}
    ranked = sorted(
        (img for img in result.images if math.isfinite(rows[img.stem]["kl"])),
        key=lambda img: rows[img.stem]["kl"],
        reverse=True,
    )[:k]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [Pair(img.stem, img.pred_path, img.target_path) for img in ranked]
    maps: dict[str, MetricMap] = {}

    def compute(pair) -> MetricMap:
        return pair_map(pair, settings, result.read, options.metric, with_pred=options.panel)

    vmax = shared_scale(pairs, options, maps, compute)
    written = []
    for pair in pairs:
        mm = maps.pop(pair.stem, None) or compute(pair)
        png = folder / f"{pair.stem}_{options.metric}.png"
        render(mm, png, options, class_names=settings.names,
               ignore_index=settings.ignore_index, shared_vmax=vmax)  # fmt: skip
        written.append(png)
    return written


def heatmap(
    pred,
    gt=None,
    out: str | Path = "heatmaps",
    *,
    metric: str = "kl",
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    ignore_color: str | None = None,
    overlay: Path | None = None,
    alpha: float = 0.6,
    colorbar: bool = False,
    panel: bool = False,
    max_side: int | None = None,
    reduce: str = "max",
    raw: Path | None = None,
    volume_slice: str | None = None,
    montage: int | None = None,
    against=None,
    rater=None,
    uncertainty: str | None = None,
    threshold: float | None = None,
    on_start=None,
    on_image=None,
    **options,
) -> list[Path]:
    """``klseg heatmap PRED [GT]`` with the command's options as keywords (``options``: those
    of ``engine.local.plan``); with ``against`` (no GT), where two models disagree; with
    ``rater`` (folders, no GT), where raters disagree; ``uncertainty`` and ``threshold``:
    ``--metric uncertainty-error``'s score and threshold. Returns the PNGs written."""
    from ..io.volumes import SliceView
    from .preflight import _check_outputs

    drawing = HeatmapOptions(
        metric=metric, cmap=cmap, vmin=vmin, vmax=vmax, log=log, ignore_color=ignore_color,
        overlay=overlay, alpha=alpha, colorbar=colorbar, panel=panel, max_side=max_side,
        reduce=reduce, view=SliceView.parse(volume_slice, montage), threshold=threshold,
    )  # fmt: skip
    if uncertainty or threshold is not None:  # --metric uncertainty-error's score
        from .uncertainty import heatmap_keywords

        options.update(heatmap_keywords(metric, uncertainty, threshold))
    _check_outputs(None, (), [pred, gt, overlay, *(rater or ())], out=out, raw=raw)
    if against is not None and gt is not None:
        raise UsageError("--against compares two predictions: give PRED and --against B, no GT")
    if rater and (gt is not None or against is not None):
        raise UsageError("--rater takes the place of GT: give PRED and --rater DIR twice or more")
    try:
        if rater:
            return make_rater_heatmaps(pred, rater, out, drawing, raw=raw, on_start=on_start,
                                       on_image=on_image, **options)  # fmt: skip
        if against is not None:
            return make_pair_heatmaps(pred, against, out, drawing, raw=raw, on_start=on_start,
                                      on_image=on_image, **options)  # fmt: skip
        return make_heatmaps(pred, gt, out, drawing, raw=raw, on_start=on_start,
                             on_image=on_image, **options)  # fmt: skip
    except OSError as error:  # inputs raise ReadError: an OS error here is an output's
        from ..io.atomic import output_error

        raise output_error(error.filename or out, error) from None


AGAINST_METRICS = ("kl", "js", "error")
"""``klseg heatmap A --against B``: KL(A‖B), JS(A, B), or 1 where the argmaxes differ."""


def divergence_map(
    pa: PredictionMap,
    pb: PredictionMap,
    settings: MetricSettings,
    metric: str,
    *,
    with_pred: bool = False,
    chunk_pixels: int,
):
    """The per-pixel KL(A‖B), JS(A, B) or argmax disagreement of two maps, as a MetricMap."""
    from ..engine.maps import INFORMATION_METRICS, MetricMap, _empty, _put, _unit

    if metric not in AGAINST_METRICS:
        raise UsageError(
            f"--against draws {', '.join(AGAINST_METRICS)} (KL(A‖B), JS, argmax "
            f"disagreement), not {metric!r}"
        )
    H, W = pa.height, pa.width
    values = _empty((H, W), np.float32, np.nan)
    pred_map = _empty((H, W), np.uint16, 0) if with_pred else None
    scale = math.log(settings.log_base) if metric in INFORMATION_METRICS else 1.0
    for start, stop, _, t in iter_pair_chunks(pa, pb, settings, chunk_pixels=chunk_pixels):
        if metric == "error":
            v = (t.pred_a != t.pred_b).astype(np.float32)
        else:
            v = (t.kl_ab if metric == "kl" else t.js) / scale
        _put(values, start, stop, v, None, np.nan)
        if pred_map is not None:
            _put(pred_map, start, stop, t.pred_a, None, 0)
    name = {"kl": "KL(A||B)", "js": "JS(A,B)", "error": "A != B"}[metric]
    return MetricMap(name, values, pred_map, None, _unit(metric, settings))


def make_pair_heatmaps(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    options,
    *,
    raw: str | Path | None = None,
    on_start=None,
    on_image=None,
    **plan_options,
) -> list[Path]:
    """Heatmaps of where model B departs from model A: one pair of files (``out`` a .png)
    or two folders paired by stem (``out`` a folder, one ``<stem>_<metric>.png`` each)."""
    from ..render.heatmap import DEFAULT_IGNORE_COLOR, colormap_lut, parse_color

    if options.metric not in AGAINST_METRICS:
        raise UsageError(
            f"--against draws --metric {', '.join(AGAINST_METRICS)}, not {options.metric!r}"
        )
    if options.overlay is not None and not Path(options.overlay).is_file():
        raise UsageError("--against takes one --overlay photo file")
    colormap_lut(options.cmap)
    parse_color(options.ignore_color or DEFAULT_IGNORE_COLOR)
    pairs, settings, read, _, _, _ = pair_models(Path(a), Path(b), None, **plan_options)
    inputs = [p for pair in pairs for p in (pair.a, pair.b)]

    def compute(pair):
        pa, pb = open_two(pair.a, pair.b, None, settings, read)
        return divergence_map(pa, pb, settings, options.metric, with_pred=options.panel,
                              chunk_pixels=read.chunk_pixels)  # fmt: skip

    return render_pairs(pairs, Path(a), Path(out), Path(raw) if raw is not None else None,
                        options, settings, inputs, compute, on_start=on_start,
                        on_image=on_image)  # fmt: skip


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
    from ..engine.raters import _open, plan_raters, rater_map
    from ..io.raters import RaterMasks
    from ..render.heatmap import DEFAULT_IGNORE_COLOR, colormap_lut, parse_color

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
