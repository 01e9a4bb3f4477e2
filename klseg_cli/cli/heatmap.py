"""``klseg heatmap``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import _progress, _stderr_console, _text
from .errors import handle_errors
from .options import (
    DebugOpt,
    EvaluationOptions,
    SpatialDimsOpt,
    evaluation_options,
    local_only,
)


class Metric(str, Enum):
    kl = "kl"
    ce = "ce"
    js = "js"
    entropy = "entropy"
    error = "error"
    confidence = "confidence"
    rater_disagreement = "rater-disagreement"
    uncertainty_error = "uncertainty-error"


class Reduce(str, Enum):
    max = "max"
    mean = "mean"


@handle_errors
@evaluation_options(late_before="uncertainty")
def heatmap(
    pred: Annotated[
        Path,
        typer.Argument(
            metavar="PRED", help="Prediction map file, or a folder of them.", callback=local_only
        ),
    ],
    gt: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="GT",
            help="Target file or folder (not needed for entropy and confidence).",
            callback=local_only,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="OUT.png for one pair; a folder for several.")
    ] = Path("heatmaps"),
    metric: Annotated[Metric, typer.Option("--metric", help="Per-pixel quantity to draw.")] = (
        Metric.kl
    ),
    cmap: Annotated[str, typer.Option("--cmap", help="Colormap name (matplotlib's).")] = "magma",
    vmin: Annotated[Optional[float], typer.Option("--vmin", help="Value drawn darkest.")] = None,
    vmax: Annotated[
        Optional[float],
        typer.Option("--vmax", help="Value drawn brightest [default: 99th percentile]."),
    ] = None,
    log: Annotated[bool, typer.Option("--log", help="Log colour scale (3 decades).")] = False,
    ignore_color: Annotated[
        Optional[str],
        typer.Option(
            "--ignore-color",
            help="Colour of ignored pixels [default: #808080, or a palette target's own].",
        ),
    ] = None,
    overlay: Annotated[
        Optional[Path],
        typer.Option("--overlay", help="Photo (or folder of photos by stem) to blend under."),
    ] = None,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Opacity of the map over --overlay.")
    ] = 0.6,
    colorbar: Annotated[
        bool, typer.Option("--colorbar", help="Add a legend strip with the value range.")
    ] = False,
    panel: Annotated[
        bool, typer.Option("--panel", help="Target | predicted classes | map, side by side.")
    ] = False,
    max_side: Annotated[
        Optional[int], typer.Option("--max-side", help="Downsample so no side exceeds N.")
    ] = None,
    reduce: Annotated[
        Reduce, typer.Option("--reduce", help="How --max-side merges pixels.")
    ] = Reduce.max,
    raw: Annotated[
        Optional[Path], typer.Option("--raw", help="Also write the float32 map as TIFF here.")
    ] = None,
    volume_slice: Annotated[
        Optional[str],
        typer.Option(
            "--slice",
            metavar="AXIS=INDEX",
            help="A volume's slice to draw, e.g. z=40 (x, y or z). [default: the middle z slice]",
            show_default=False,
        ),
    ] = None,
    montage: Annotated[
        Optional[int],
        typer.Option(
            "--montage",
            metavar="N",
            help="Draw N evenly spaced slices of a volume in one PNG (along --slice's axis, "
            "z by default).",
        ),
    ] = None,
    spatial_dims: SpatialDimsOpt = 2,
    allow_affine_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-affine-mismatch",
            help="Draw NIfTI pairs whose affine or voxel spacing differ.",
        ),
    ] = False,
    against: Annotated[
        Optional[Path],
        typer.Option(
            "--against",
            metavar="B",
            help="A second model's map (or folder): draw where PRED and B disagree "
            "(--metric kl: KL(PRED||B), js, error: argmax differs); no GT.",
        ),
    ] = None,
    rater: Annotated[
        Optional[list[str]],
        typer.Option(
            "--rater",
            metavar="DIR",
            help="A rater's label masks (repeat, at least twice; no GT): --metric "
            "rater-disagreement draws 1 - the raters' top frequency.",
            callback=local_only,
        ),
    ] = None,
    shared: EvaluationOptions = EvaluationOptions(),
    uncertainty: Annotated[
        Optional[str],
        typer.Option(
            "--uncertainty",
            metavar="SCORE",
            help="--metric uncertainty-error: the score (entropy, maxprob, margin). "
            "[default: entropy]",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            help="--metric uncertainty-error: a score at or above it is uncertain. "
            "[default: each image's UEO threshold]",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Draw a per-pixel metric (KL by default) as a colour PNG: where divergence sits.

    With --against B (no GT), where two models disagree: KL(PRED||B), JS or argmax.

    Example:

        klseg heatmap preds/x.npy labels/x.png -o x_kl.png --colorbar
        klseg heatmap preds_a/x.npy --against preds_b/x.npy --metric js -o x_js.png
        klseg heatmap preds/ --rater a/ --rater b/ --metric rater-disagreement -o maps/
    """
    from ..commands.heatmap import heatmap as draw

    plan = shared.plan()
    err = _stderr_console()
    with _progress(err, "rendering") as tick:
        written = draw(
            pred, gt, out, metric=metric.value, cmap=cmap, vmin=vmin, vmax=vmax, log=log,
            ignore_color=ignore_color, overlay=overlay, alpha=alpha, colorbar=colorbar,
            panel=panel, max_side=max_side, reduce=reduce.value, raw=raw,
            volume_slice=volume_slice, montage=montage, against=against, rater=rater,
            uncertainty=uncertainty, threshold=threshold,
            on_start=tick.start, on_image=tick.advance, spatial_dims=spatial_dims,
            allow_affine_mismatch=allow_affine_mismatch, **plan,
        )  # fmt: skip
    for path in written:
        err.print(f"wrote {_text(path)}", highlight=False)
