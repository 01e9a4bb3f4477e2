"""``klseg evaluate`` as a library function: evaluate, add intervals and requirement rows,
write the report folder (with heatmaps of the worst images), the gate files and the
reliability diagram. ``engine.local.evaluate`` computes; this is what the command does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.results import EvaluationResult
from ..errors import UsageError
from .preflight import _bootstrap_plan, _check_outputs, _check_paths_writable, _same_folder
from .requirements import gate_files


def calibration_options(temperature, views: bool, band: int, reqs) -> dict:
    """``plan`` keywords of evaluate's calibration options; a requirement that names a
    calibration view turns the views on (a gate never fails for want of a flag)."""
    from ..core.calibration import VIEW_NAMES
    from .calibrate import load_temperature

    views = views or any(r.klass is None and r.metric in VIEW_NAMES for r in reqs)
    t = load_temperature(temperature) if temperature is not None else 1.0
    return {"temperature": t, "calibration_views": views, "boundary_band": band}


def volume_options(boundary: bool, tolerance, width, spacing, reqs) -> dict:
    """``plan`` keywords of evaluate's boundary options; a requirement that names a
    boundary metric turns them on, as for the calibration views."""
    from ..core.boundary import BOUNDARY_METRICS, BoundaryOptions, check_available, parse_spacing

    names = {f"{m}_image_mean" for m in BOUNDARY_METRICS}
    boundary = boundary or any(r.klass is None and r.metric in names for r in reqs)
    if not boundary:
        return {"boundary": None}
    check_available()
    opts = BoundaryOptions(nsd_tolerance=tolerance, width=width, spacing=parse_spacing(spacing))
    return {"boundary": opts}


@dataclass
class EvaluationReport:
    """What ``evaluate_report`` did: the result; its ``summary.json`` object, with intervals
    and requirement rows (None when no pair could be evaluated: nothing was written); a note
    on the intervals; whether the gate files went out with the report."""

    result: EvaluationResult
    summary: dict | None = None
    note: str | None = None
    gate_written: bool = False


def evaluate_report(
    pred,
    gt,
    *,
    out: Path | None = None,
    heatmaps: int = 0,
    keep_going: bool = False,
    jobs: int | None = None,
    require=None,
    baseline: Path | None = None,
    allow_settings_change: bool = False,
    junit: Path | None = None,
    markdown: Path | None = None,
    bootstrap: int | None = None,
    seed: int | None = None,
    common_images: bool = False,
    temperature: str | None = None,
    calibration_views: bool = False,
    boundary_band: int = 3,
    reliability: Path | None = None,
    boundary: bool = False,
    nsd_tolerance: float | None = None,
    boundary_width: float | None = None,
    spacing: str | None = None,
    zarr_path: str | None = None,
    scheduler: str | None = None,
    rater=None,
    samples=None,
    uncertainty=None,
    qc_threshold: float | None = None,
    risk_coverage: Path | None = None,
    on_start=None,
    on_image=None,
    **options,
) -> EvaluationReport:
    """``klseg evaluate PRED GT`` with the command's options as keywords (``options``: those
    of ``engine.local.plan``, as ``klseg_cli.evaluate`` takes them). ``rater`` (folders, at
    least two) takes the place of ``gt`` (None then), with ``samples``; ``uncertainty`` and
    ``qc_threshold``: failure detection (DESIGN §11). Every output is checked before any
    work; the report folder ``out``, ``junit``, ``markdown``, ``reliability`` and
    ``risk_coverage`` are written when given."""
    from ..engine.local import evaluate as run
    from ..io.remote import as_input
    from ..render import formats, report
    from . import uncertainty as unc  # --uncertainty (DESIGN §11)
    from .requirements import load_summary

    pred, gt = as_input(pred), as_input(gt)  # a URL stays a URL (remote.py)
    if zarr_path is not None:
        if options.get("npz_key") is not None:
            raise UsageError("pass --npz-key or --zarr-path, not both")
        options["npz_key"] = zarr_path  # the array inside a container, as --npz-key
    if scheduler:  # a Dask cluster runs the pairs (engine_dask.py); the rest is the same
        import functools

        from ..engine.dask_cluster import dask_evaluate

        run = functools.partial(dask_evaluate, scheduler=scheduler)

    reqs, rater_runner = _requirement_names(gt, rater, samples, require, scheduler, heatmaps)
    run = rater_runner or run
    base = load_summary(baseline) if baseline is not None else None
    n_resamples, base_table = _bootstrap_plan(require, bootstrap, baseline, base)
    if heatmaps and out is None:
        raise UsageError("--heatmaps needs --out DIR (they go to DIR/heatmaps/)")
    _check_report_outputs(out, [pred, gt, *(rater or ()), *(samples or ())], baseline,
                          junit=junit, markdown=markdown, reliability=reliability,
                          risk_coverage=risk_coverage)  # fmt: skip
    options.update(calibration_options(temperature, calibration_views, boundary_band, reqs))
    options.update(volume_options(boundary, nsd_tolerance, boundary_width, spacing, reqs))
    options.update(unc.plan_keywords(uncertainty, qc_threshold, reqs))
    if rater and options.get("uncertainty"):
        raise UsageError(
            "failure detection (--uncertainty, or a --require on its metrics) needs one label "
            "target to call a pixel wrong; it does not apply with --rater (pass GT instead)"
        )
    unc.check_risk_coverage(risk_coverage, options.get("uncertainty", ()), out)
    result = run(pred, gt, keep_going=keep_going, jobs=jobs, on_start=on_start,
                 on_image=on_image, **options)  # fmt: skip
    if not result.images:  # --keep-going and every pair failed: no report of dashes
        return EvaluationReport(result)

    summary, note = result.summary(), None
    if n_resamples:
        from ..io.statsfile import StatsTable
        from .intervals import add_intervals, requirement_needs

        table = StatsTable.from_result(result)
        note = add_intervals(summary, table, n_resamples=n_resamples, seed=seed or 0,
                             baseline=base_table, common_only=common_images,
                             delta_required=requirement_needs(require or ())[1])  # fmt: skip
    if require:
        from .requirements import check_requirements

        summary["requirements"] = check_requirements(
            summary, require, baseline=base, allow_settings_change=allow_settings_change
        )
    inputs = [
        p
        for img in result.images
        for p in (img.pred_path, img.target_path, *getattr(img, "rater_paths", ()))
    ]
    outputs = [out / name for name in report.REPORT_FILES] if out is not None else []
    formats.refuse_overwriting_inputs([*outputs, junit, markdown, reliability, risk_coverage],
                                      [*inputs, baseline])  # fmt: skip
    gate_written = False
    if out is not None:
        folders = {}
        if heatmaps:
            from ..render.heatmap import HeatmapOptions
            from .heatmap import worst_images_heatmaps

            def fill(folder):
                options = HeatmapOptions(metric="kl", colorbar=True)
                return worst_images_heatmaps(result, folder, heatmaps, options)

            folders["heatmaps"] = fill
        # the gate files go out under the report's lock, so they match the report
        also = gate_files(summary, summary["requirements"], junit=junit, markdown=markdown)
        report.write_reports(summary, out, result=result, folders=folders, also=also)
        gate_written = True
    if reliability is not None:  # after the report: it may go into the report's folder
        from ..render.calibration_report import write_reliability_outputs

        write_reliability_outputs(result, reliability)
    if risk_coverage is not None:
        unc.write_risk_coverage(result, risk_coverage)
    return EvaluationReport(result, summary, note, gate_written)


def _requirement_names(gt, rater, samples, require, scheduler, heatmaps):
    """(the parsed requirements, the rater run or None): a malformed or misnamed gate fails
    before any work; ``--rater``/``--samples`` take the place of GT (``commands/raters``)."""
    from .requirements import check_names

    if rater or samples:
        from .raters import RATER_NAMES, rater_run

        reqs = check_names(require or (), extra=sorted(RATER_NAMES))  # before any work
        return reqs, rater_run(gt, rater, samples, reqs, scheduler=scheduler, heatmaps=heatmaps)
    if gt is None:
        raise UsageError("missing argument GT: pass the targets, or --rater DIR at least twice")
    from .raters import check_no_rater_names

    check_no_rater_names(require or ())
    return check_names(require or ()), None


def _check_report_outputs(out, inputs, baseline, *, junit, markdown, reliability,
                          risk_coverage) -> None:  # fmt: skip
    """Before any work: every output can be written and none is an input, a report file or
    another output; ``out`` is not an input folder."""
    from ..io.outputs import check_out_dir, check_output_file
    from ..render import report

    _check_outputs(out, report.REPORT_FILES, [*inputs, baseline], junit=junit,
                   markdown=markdown, reliability=reliability,
                   risk_coverage=risk_coverage)  # fmt: skip
    if out is not None:
        check_out_dir(out)
    _check_paths_writable(junit, markdown, out)
    if reliability is not None:
        if reliability.suffix.lower() != ".png":
            raise UsageError(f"--reliability {reliability}: the diagram is a PNG; name it .png")
        check_output_file(reliability, "--reliability", report_dir=out)
    if out is not None and _same_folder(out, *[p for p in inputs if p is not None]):
        raise UsageError(f"--out {out} is an input folder; give the report a folder of its own")
