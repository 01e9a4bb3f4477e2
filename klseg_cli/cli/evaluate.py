"""``klseg evaluate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import _console, _progress, _stderr_console, _text
from .errors import fail, handle_errors
from .gate import gate_outputs
from .options import (
    AllowSettingsOpt,
    BaselineOpt,
    BootstrapOpt,
    CommonImagesOpt,
    DebugOpt,
    EvaluationOptions,
    GithubSummaryOpt,
    JunitOpt,
    MarkdownOpt,
    OutputFormat,
    RequireOpt,
    SeedOpt,
    SpatialDimsOpt,
    evaluation_options,
    local_only,
)


@handle_errors
@evaluation_options(inside=("keep_going", "jobs"))
def evaluate(
    pred: Annotated[
        str,
        typer.Argument(
            metavar="PRED", help="Prediction map file, or a folder of them (or a URL: s3://...)."
        ),
    ],
    gt: Annotated[
        Optional[str],
        typer.Argument(
            metavar="GT",
            help="Target mask file, or a folder of them (or a URL). Left out with --rater.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write per_image.csv, per_class.csv, summary.json here."),
    ] = None,
    rater: Annotated[
        Optional[list[str]],
        typer.Option(
            "--rater",
            metavar="DIR",
            help="A rater's label masks (folder, paired by stem like GT); give it once per "
            "rater, at least twice, instead of GT: the target is the raters' frequency map.",
            callback=local_only,
        ),
    ] = None,
    samples: Annotated[
        Optional[list[str]],
        typer.Option(
            "--samples",
            metavar="DIR",
            help="With --rater: a folder of sampled prediction maps (repeatable); their argmax "
            "maps are the model's samples for ged. [default: the argmax of PRED]",
            show_default=False,
            callback=local_only,
        ),
    ] = None,
    output_format: Annotated[
        OutputFormat,
        typer.Option("--format", help="table: rich tables; json: summary JSON on stdout."),
    ] = OutputFormat.table,
    heatmaps: Annotated[
        int,
        typer.Option(
            "--heatmaps",
            help="Also write KL heatmaps of the K images with the highest mean KL "
            "into OUT/heatmaps/.",
            metavar="K",
            min=0,
        ),
    ] = 0,
    shared: EvaluationOptions = EvaluationOptions(),
    keep_going: Annotated[
        bool,
        typer.Option("--keep-going", help="Evaluate every readable pair; still exit 2 on errors."),
    ] = False,
    jobs: Annotated[
        Optional[int],
        typer.Option(
            "--jobs",
            "-j",
            help="Images evaluated in parallel (threads with the compiled kernel, else "
            "processes); results are identical for any value. [default: the available "
            "cores, at most one per image; 1 for small maps without the kernel]",
            show_default=False,
        ),
    ] = None,
    require: RequireOpt = None,
    baseline: BaselineOpt = None,
    allow_settings_change: AllowSettingsOpt = False,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    github_summary: GithubSummaryOpt = False,
    bootstrap: BootstrapOpt = None,
    seed: SeedOpt = None,
    common_images: CommonImagesOpt = False,
    temperature: Annotated[
        Optional[str],
        typer.Option(
            "--temperature",
            metavar="T|calibration.json",
            help="Apply a fitted temperature on the fly: p -> softmax(log p / T). A number, "
            "or the calibration.json of klseg calibrate.",
        ),
    ] = None,
    calibration_views: Annotated[
        bool,
        typer.Option(
            "--calibration-views",
            help="Also compute ece_adaptive, ece_classwise, ece_boundary, ece_interior "
            "(NumPy path; on by itself when a --require names one).",
        ),
    ] = False,
    boundary_band: Annotated[
        int,
        typer.Option(
            "--boundary-band",
            metavar="K",
            help="Pixels within K pixels of another target class count as boundary.",
        ),
    ] = 3,
    reliability: Annotated[
        Optional[Path],
        typer.Option("--reliability", metavar="FILE.png", help="Write the reliability diagram."),
    ] = None,
    uncertainty: Annotated[
        Optional[list[str]],
        typer.Option(
            "--uncertainty",
            metavar="SCORE[,SCORE]",
            help="Failure detection: AUROC, AURC, E-AURC, UEO of uncertainty scores "
            "(entropy, maxprob, margin) for finding wrong pixels, image-level QC and qc.csv "
            "(on by itself when a --require names one).",
        ),
    ] = None,
    qc_threshold: Annotated[
        Optional[float],
        typer.Option(
            "--qc-threshold",
            metavar="IOU",
            help="Images with mIoU below this are failures for qc_auroc_*. [default: 0.5]",
            show_default=False,
        ),
    ] = None,
    risk_coverage: Annotated[
        Optional[Path],
        typer.Option("--risk-coverage", metavar="FILE.png", help="Write the risk-coverage curves."),
    ] = None,
    boundary: Annotated[
        bool,
        typer.Option(
            "--boundary",
            help="Also compute boundary metrics per class and image: hd95, assd, nsd, biou "
            "(distance transforms; on by itself when a --require names one).",
        ),
    ] = False,
    nsd_tolerance: Annotated[
        Optional[float],
        typer.Option(
            "--nsd-tolerance",
            metavar="TAU",
            help="NSD tolerance in physical units. [default: one voxel step, the smallest spacing]",
            show_default=False,
        ),
    ] = None,
    boundary_width: Annotated[
        Optional[float],
        typer.Option(
            "--boundary-width",
            metavar="D",
            help="Boundary IoU band width in physical units. [default: 2% of the image diagonal]",
            show_default=False,
        ),
    ] = None,
    spacing: Annotated[
        Optional[str],
        typer.Option(
            "--spacing",
            metavar="SX,SY[,SZ]",
            help="Voxel spacing for boundary metrics, in the files' axis order (overrides "
            "a NIfTI header). [default: the NIfTI header, else 1]",
            show_default=False,
        ),
    ] = None,
    spatial_dims: SpatialDimsOpt = 2,
    allow_affine_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-affine-mismatch",
            help="Evaluate NIfTI pairs whose affine or voxel spacing differ.",
        ),
    ] = False,
    zarr_path: Annotated[
        Optional[str],
        typer.Option("--zarr-path", metavar="KEY", help="The array inside a Zarr group."),
    ] = None,
    scheduler: Annotated[
        Optional[str],
        typer.Option(
            "--scheduler",
            metavar="tcp://HOST:PORT|local:N",
            envvar="DASK_SCHEDULER_ADDRESS",
            help="Run on a Dask cluster (klseg[dask]); local:N starts N local workers.",
            show_envvar=True,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Evaluate probability maps against targets: KL, CE, JS, entropy, Brier, IoU, Dice, ECE.

    Example:

        klseg evaluate preds/ labels/ --classes classes.txt --out report/
        klseg evaluate preds/ --rater rater_a/ --rater rater_b/ --rater rater_c/
    """
    from ..commands.evaluate import evaluate_report
    from ..render import formats, report

    options = shared.plan()
    err = _stderr_console()
    with _progress(err, "evaluating") as tick:
        done = evaluate_report(
            pred, gt, out=out, heatmaps=heatmaps, keep_going=keep_going, jobs=jobs,
            require=require, baseline=baseline, allow_settings_change=allow_settings_change,
            junit=junit, markdown=markdown, bootstrap=bootstrap, seed=seed,
            common_images=common_images, temperature=temperature,
            calibration_views=calibration_views, boundary_band=boundary_band,
            reliability=reliability, boundary=boundary, nsd_tolerance=nsd_tolerance,
            boundary_width=boundary_width, spacing=spacing, zarr_path=zarr_path,
            scheduler=scheduler, rater=rater, samples=samples, uncertainty=uncertainty,
            qc_threshold=qc_threshold, risk_coverage=risk_coverage,
            on_start=tick.start, on_image=tick.advance,
            spatial_dims=spatial_dims, allow_affine_mismatch=allow_affine_mismatch, **options,
        )  # fmt: skip
    result, summary = done.result, done.summary
    if summary is None:  # --keep-going and every pair failed: no report of dashes
        for error in result.errors:
            sys.stderr.write(f"Error: {error['file']}: {error['message']}\n")
        raise fail("no pair could be evaluated; no report was written")
    for path in result.unpaired_predictions:
        err.print(f"[yellow]warning:[/] {_text(path)}: prediction has no target; skipped",
                  highlight=False)  # fmt: skip
    for path in result.missing_predictions:
        err.print(
            f"[yellow]warning:[/] {_text(path)}: target has no prediction; left out",
            highlight=False,
        )
    if done.note:
        from rich.markup import escape

        err.print(f"[yellow]warning:[/] {escape(done.note)}", highlight=False)
    if output_format is OutputFormat.json:
        sys.stdout.write(formats.summary_json(summary))
    else:
        console = _console()
        console.print(report.summary_table(summary))
        console.print(report.class_table(summary))
        if out is not None:
            console.print(f"reports written to {_text(out)}/", highlight=False)
    code = gate_outputs(
        summary, summary["requirements"], junit=junit, markdown=markdown,
        github_summary=github_summary, json_on_stdout=output_format is OutputFormat.json,
        written=done.gate_written,
    ) if (require or junit or markdown or github_summary) else 0  # fmt: skip
    for error in result.errors:
        sys.stderr.write(f"Error: {error['file']}: {error['message']}\n")
    if result.errors:
        raise typer.Exit(code=2)
    raise typer.Exit(code=code)
