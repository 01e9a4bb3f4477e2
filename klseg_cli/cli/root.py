"""The ``klseg`` command: parse options, call the library, render, exit.

No maths and no file parsing here. Exit codes: 0 success, 1 a requirement failed, 2 a usage,
input or output error (``KlsegError`` and Click's usage errors: one line on stderr), 3 an
internal error (a bug: one line and a hint to rerun with ``--debug`` for the traceback),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 stdout closed by its reader.
"""

from __future__ import annotations

import functools
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .. import __version__
from ..defaults import DEFAULT_EPS
from ..errors import KlsegError, UsageError

EXIT_INTERNAL = 3
"""An unexpected exception (a bug): never 1, which CI reads as a failed requirement."""


def _one_line(text: str) -> str:
    from ..render.report import printable

    return printable(" ".join(str(text).split()))


class OneLineErrors(TyperGroup):
    """Click's usage errors as one ``Error:`` line on stderr and exit 2 (Click prints the
    usage, a hint and the message: three lines, or a box under rich)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from typer import _click

        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _click.exceptions.NoArgsIsHelpError as err:
            err.show()  # `klseg` alone: the help text is the right answer (exit 2, as Click)
            sys.exit(err.exit_code)
        except _click.exceptions.ClickException as err:
            message = err.format_message().replace("Value error, ", "")  # Typer's pydantic text
            sys.stderr.write(f"Error: {_one_line(message)}\n")
            sys.exit(err.exit_code)
        except typer.Abort:
            sys.stderr.write("Error: aborted\n")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="klseg",
    help="KL divergence, cross-entropy, IoU and calibration for segmentation probability maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich help pulls in markdown-it and doubles start-up
)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class InputKind(str, Enum):
    probs = "probs"
    logits = "logits"


class Layout(str, Enum):
    hwc = "hwc"
    chw = "chw"


def _console(*, stderr: bool = False):
    """A rich console; in a CI log (not a terminal) 160 columns wide instead of rich's 80,
    so that requirement texts and table captions are not wrapped mid-phrase."""
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=160 if wide else None)


def _stderr_console():
    return _console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line on stderr and return the Exit to raise."""
    sys.stderr.write(f"Error: {_one_line(message)}\n")
    sys.stderr.flush()
    return typer.Exit(code=code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup (temporary files and folders) runs."""


def _on_sigterm(_signum, _frame) -> None:
    raise Terminated()


def handle_errors(func):
    """KlsegError → one stderr line + its exit code (2); Ctrl-C → 130, SIGTERM → 143;
    any other exception is a bug → one line + exit 3. ``--debug`` raises instead."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ..io.outputs import ReportInterrupted

        debug = kwargs.get("debug", False)
        try:
            return func(*args, **kwargs)
        except (typer.Exit, SystemExit):
            raise
        except KlsegError as err:
            if debug:
                raise
            raise fail(str(err), err.exit_code) from None
        except KeyboardInterrupt as err:
            if debug:
                raise
            import signal

            sigterm = isinstance(err, Terminated) or getattr(err, "signum", 0) == signal.SIGTERM
            what = "terminated" if sigterm else "interrupted"
            if isinstance(err, ReportInterrupted):
                done = f"the report in {err.report} was completed first"
            else:
                done = "no report was written"
            raise fail(f"{what}; {done}", 143 if what == "terminated" else 130) from None
        except BrokenPipeError:  # `klseg ... | head`: the reader left; not a failed gate
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the final flush must not fail again
            raise typer.Exit(code=141) from None  # as a shell reports a SIGPIPE death
        except Exception as err:
            if debug:
                raise
            text = str(err)
            text = text if len(text) <= 300 else text[:300] + "…"
            hint = "rerun with --debug for a traceback"
            raise fail(
                f"internal error: {type(err).__name__}: {text}; {hint}", EXIT_INTERNAL
            ) from None

    return wrapper


LOG_BASES = {"e": math.e, "2": 2.0, "10": 10.0}


def parse_log_base(text: str) -> float:
    """``e``, ``2``, ``10`` or a finite number above 1: a base ≤ 1 flips or zeroes every
    divergence (0.5 makes KL negative, inf makes it 0) and would pass any ``<=`` gate."""
    name = text.strip().lower()
    if name in LOG_BASES:
        return LOG_BASES[name]
    try:
        value = float(name)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 1):
        raise UsageError(
            f"--log-base must be e, 2, 10 or a finite number above 1, got {text!r}"
        ) from None
    return value


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"klseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
) -> None:
    """KL divergence, cross-entropy, IoU and calibration for segmentation probability maps."""
    _print_library_warnings()


def _print_library_warnings() -> None:
    """The library's KlsegWarnings become one ``warning:`` line each on stderr."""
    import warnings

    from ..errors import KlsegWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KlsegWarning):
            sys.stderr.write(f"warning: {' '.join(str(message).split())}\n")
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    warnings.simplefilter("always", KlsegWarning)


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]
TimeoutOpt = Annotated[
    Optional[float],
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="Give up a remote read (URL inputs) after this long without a byte; also bounds "
        "connecting. Env: KLSEG_TIMEOUT. [default: 60]",
    ),
]
StrictZarrOpt = Annotated[
    bool,
    typer.Option(
        "--strict-zarr",
        help="A missing Zarr chunk is an error (without it: read as the fill value, counted, "
        "warned and recorded in summary.json).",
    ),
]
ClassesOpt = Annotated[
    Optional[str],
    typer.Option(
        "--classes",
        help="Class names: 'road,car,...', or a file: one name a line, 'ID NAME' lines, or "
        "JSON (a list, or {id: name}).",
    ),
]
LayoutOpt = Annotated[
    Optional[Layout],
    typer.Option("--layout", help="Class axis of 3-D maps when it is ambiguous (H = W = C)."),
]
NpzKeyOpt = Annotated[
    Optional[str], typer.Option("--npz-key", help="Array to use from a .npz with several.")
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option("--max-pixels", help="Refuse images whose header claims more pixels per plane."),
]
IgnoreOpt = Annotated[
    Optional[list[int]],
    typer.Option(
        "--ignore-index",
        metavar="N",
        help="Label value that counts nowhere, even inside 0..C-1 (e.g. 0 for 'void'); "
        "repeatable. Given values replace the default 255 (pass it too to keep it). "
        "[default: 255; none with more than 255 classes, where 255 is a class]",
    ),
]
LabelMapOpt = Annotated[
    Optional[str],
    typer.Option(
        "--label-map",
        metavar="FILE|cityscapes",
        help="Map raw target ids to class ids while reading: a JSON object or a two-column "
        "CSV (raw,class); ids not listed are ignored. 'cityscapes': labelIds -> trainIds.",
    ),
]
ReduceZeroOpt = Annotated[
    bool,
    typer.Option(
        "--reduce-zero-label",
        help="Label 0 is 'unlabelled' (ignored) and every other label is one more than its "
        "class (ADE20K / mmsegmentation).",
    ),
]
ExcludeClassOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--exclude-class",
        metavar="NAME|ID",
        help="Leave a class out of the class means (miou, mdice, macc, fwiou), e.g. the "
        "background; its per-class row stays (repeatable).",
    ),
]
SmoothingOpt = Annotated[
    float, typer.Option("--smoothing", help="Label smoothing ε of hard targets.")
]
InputOpt = Annotated[InputKind, typer.Option("--input", help="Maps hold probabilities or logits.")]
EpsOpt = Annotated[float, typer.Option("--eps", help="Clip p at eps before log p.")]
LogBaseOpt = Annotated[
    str, typer.Option("--log-base", help="'e' (nats), 2 (bits), 10, or a number above 1.")
]
SoftGtOpt = Annotated[bool, typer.Option("--soft-gt", help="Targets are float probability maps.")]
RenormalizeOpt = Annotated[
    bool,
    typer.Option("--renormalize", help="Divide each pixel's probabilities by their sum first."),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option("--allow-missing", help="Go on when targets lack a prediction (they are listed)."),
]
PredSuffixOpt = Annotated[
    str, typer.Option("--pred-suffix", help="Stripped from prediction stems.")
]
GtSuffixOpt = Annotated[str, typer.Option("--gt-suffix", help="Stripped from target stems.")]
ChunkOpt = Annotated[
    int, typer.Option("--chunk-pixels", help="Pixels per chunk (memory vs. speed).")
]


RequireOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--require",
        metavar="EXPR",
        help="Gate: 'NAME OP VALUE', e.g. 'miou_pooled >= 0.7', 'iou[road] > 0.9', "
        "'kl_pooled <= baseline + 0.01' (repeatable). Exit 1 when one fails.",
    ),
]
BaselineOpt = Annotated[
    Optional[Path],
    typer.Option("--baseline", help="An earlier summary.json that 'baseline' refers to."),
]
AllowSettingsOpt = Annotated[
    bool,
    typer.Option(
        "--allow-settings-change", help="Compare with a baseline made with other settings."
    ),
]
JunitOpt = Annotated[
    Optional[Path], typer.Option("--junit", help="Write the requirements as JUnit XML here.")
]
MarkdownOpt = Annotated[
    Optional[Path], typer.Option("--markdown", help="Write a Markdown summary here.")
]
GithubSummaryOpt = Annotated[
    bool,
    typer.Option("--github-summary", help="Append the Markdown summary to $GITHUB_STEP_SUMMARY."),
]
BootstrapOpt = Annotated[
    Optional[int],
    typer.Option(
        "--bootstrap",
        metavar="N",
        help="95% intervals over images from N resamples (paired by stem) [default: off; "
        "1000 when a requirement uses low(), high() or delta()].",
    ),
]
SeedOpt = Annotated[
    Optional[int], typer.Option("--seed", help="Seed of the bootstrap resamples [default: 0].")
]
CommonImagesOpt = Annotated[
    bool,
    typer.Option(
        "--common-images",
        help="delta(): pair only the images both runs have (default: different image sets "
        "are an error listing them).",
    ),
]


def gate_files(summary, rows, *, junit, markdown) -> dict:
    """``{path: text}`` of the ``--junit`` and ``--markdown`` files asked for."""
    from ..render import report

    files = {}
    if junit is not None:
        files[junit] = report.junit_xml(rows)
    if markdown is not None:
        files[markdown] = report.markdown_report(summary, rows)
    return files


def gate_outputs(summary, rows, *, junit, markdown, github_summary, json_on_stdout,
                 written=False) -> int:  # fmt: skip
    """Print and write the requirement results; returns the exit code they call for (0 or 1).

    ``written``: the --junit and --markdown files were written already (with the report).
    """
    import os

    from ..io.atomic import write_text
    from ..render import report

    if rows:
        _console(stderr=json_on_stdout).print(report.requirements_table(rows))
    if not written:
        for path, content in gate_files(summary, rows, junit=junit, markdown=markdown).items():
            write_text(path, content)
    text = report.markdown_report(summary, rows)
    if github_summary:
        target = os.environ.get("GITHUB_STEP_SUMMARY")
        if target:
            from ..io.atomic import output_error

            try:
                with open(target, "a", encoding="utf-8") as fh:
                    fh.write(text)
            except OSError as err:
                raise output_error(target, err) from None
        else:
            sys.stderr.write("warning: --github-summary: GITHUB_STEP_SUMMARY is not set\n")
    if os.environ.get("GITHUB_ACTIONS") == "true":
        stream = sys.stderr if json_on_stdout else sys.stdout
        for line in report.github_annotations(rows):
            stream.write(line + "\n")
        stream.flush()
    return 1 if any(not r["passed"] for r in rows) else 0


def _bootstrap_plan(require, bootstrap, baseline, base):
    """(resamples, the baseline's StatsTable or None) for --bootstrap, low/high/delta."""
    from ..commands.intervals import requirement_needs, resamples_for, stats_of

    n_resamples = resamples_for(bootstrap, require or ())
    needs_delta = requirement_needs(require or ())[1]
    if needs_delta and baseline is None:
        raise UsageError("delta() compares with a baseline: pass --baseline old/summary.json")
    base_table = None
    if baseline is not None and n_resamples:
        base_table = stats_of(baseline, base, required="delta()" if needs_delta else None)
    return n_resamples, base_table


def _same_folder(out: Path, *inputs) -> bool:
    """Whether ``out`` is one of the input folders (local ones; URLs are never ``out``)."""
    try:
        resolved = Path(out).resolve()
        return any("://" not in str(p) and Path(p).resolve() == resolved for p in inputs)
    except (OSError, RuntimeError):
        return False


def _check_paths_writable(junit, markdown, report_dir=None) -> None:
    from ..io.outputs import check_output_file

    for option, path in (("--junit", junit), ("--markdown", markdown)):
        if path is not None:
            check_output_file(path, option, report_dir=report_dir)


def _check_outputs(report_dir, report_files, inputs, **named) -> None:
    """Before any work: no output is an input, a report file, or another output."""
    from ..io.outputs import check_distinct_outputs
    from ..render.report import refuse_overwriting_inputs

    options = {"--" + k.replace("_", "-"): v for k, v in named.items()}
    check_distinct_outputs(options, report_dir, report_files)
    refuse_overwriting_inputs(list(options.values()), inputs)


PLAN_OPTIONS = (
    "classes", "ignore_index", "smoothing", "input_kind", "eps", "log_base", "layout",
    "soft_gt", "renormalize", "allow_missing", "pred_suffix", "gt_suffix", "npz_key",
    "max_pixels", "chunk_pixels", "label_map", "reduce_zero_label", "exclude_class",
    "timeout", "strict_zarr",
)  # fmt: skip
"""The options every computing command shares (parameters of ``evaluation.plan``)."""


def calibration_options(temperature, views: bool, band: int, reqs) -> dict:
    """``plan`` keywords of evaluate's calibration options; a requirement that names a
    calibration view turns the views on (a gate never fails for want of a flag)."""
    from ..commands.calibrate import load_temperature
    from ..core.calibration import VIEW_NAMES

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


def plan_options(params: dict) -> dict:
    """``evaluation.plan`` keywords from a command's parameters (pass ``locals()``)."""
    opts = {name: params[name] for name in PLAN_OPTIONS}
    if opts["ignore_index"] is not None:  # None: 255, unless it is a class (> 255 classes)
        opts["ignore_index"] = tuple(opts["ignore_index"])
    opts["input_kind"] = opts["input_kind"].value
    opts["log_base"] = parse_log_base(opts["log_base"])
    opts["layout"] = opts["layout"].value if opts["layout"] else None
    opts["exclude_class"] = tuple(opts["exclude_class"] or ())
    return opts


@app.command()
@handle_errors
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
    classes: ClassesOpt = None,
    ignore_index: IgnoreOpt = None,
    smoothing: SmoothingOpt = 0.0,
    input_kind: InputOpt = InputKind.probs,
    eps: EpsOpt = DEFAULT_EPS,
    log_base: LogBaseOpt = "e",
    layout: LayoutOpt = None,
    soft_gt: SoftGtOpt = False,
    renormalize: RenormalizeOpt = False,
    allow_missing: AllowMissingOpt = False,
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
    pred_suffix: PredSuffixOpt = "",
    gt_suffix: GtSuffixOpt = "",
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    chunk_pixels: ChunkOpt = 1 << 15,
    label_map: LabelMapOpt = None,
    reduce_zero_label: ReduceZeroOpt = False,
    exclude_class: ExcludeClassOpt = None,
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
    spatial_dims: Annotated[
        int,
        typer.Option(
            "--spatial-dims",
            help="3: .npy/.npz files are volumes (X,Y,Z[,C]); NIfTI files always are.",
            min=2,
            max=3,
        ),
    ] = 2,
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
    timeout: TimeoutOpt = None,
    strict_zarr: StrictZarrOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate probability maps against targets: KL, CE, JS, entropy, Brier, IoU, Dice, ECE.

    Example:

        klseg evaluate preds/ labels/ --classes classes.txt --out report/
        klseg evaluate preds/ --rater rater_a/ --rater rater_b/ --rater rater_c/
    """
    from ..commands.requirements import check_names, load_summary
    from ..engine.local import evaluate as run
    from ..io.remote import as_input
    from ..render import report

    pred, gt = as_input(pred), as_input(gt)  # a URL stays a URL (remote.py)
    if zarr_path is not None:
        if npz_key is not None:
            raise UsageError("pass --npz-key or --zarr-path, not both")
        npz_key = zarr_path  # the array inside a container, as --npz-key
    if scheduler:  # a Dask cluster runs the pairs (engine_dask.py); the rest is the same
        import functools

        from ..engine.dask_cluster import dask_evaluate

        run = functools.partial(dask_evaluate, scheduler=scheduler)

    if rater or samples:
        from ..commands.raters import RATER_NAMES, rater_run

        reqs = check_names(require or (), extra=sorted(RATER_NAMES))  # before any work
        run = rater_run(gt, rater, samples, reqs, scheduler=scheduler, heatmaps=heatmaps)
    elif gt is None:
        raise UsageError("missing argument GT: pass the targets, or --rater DIR at least twice")
    else:
        from ..commands.raters import check_no_rater_names

        check_no_rater_names(require or ())
        reqs = check_names(require or ())  # a malformed or misnamed gate fails before any work
    base = load_summary(baseline) if baseline is not None else None
    n_resamples, base_table = _bootstrap_plan(require, bootstrap, baseline, base)
    if heatmaps and out is None:
        raise UsageError("--heatmaps needs --out DIR (they go to DIR/heatmaps/)")
    _check_outputs(out, report.REPORT_FILES, [pred, gt, *(rater or ()), *(samples or ()),
                   baseline], junit=junit, markdown=markdown,
                   reliability=reliability, risk_coverage=risk_coverage)  # fmt: skip
    if out is not None:
        from ..io.outputs import check_out_dir

        check_out_dir(out)
    _check_paths_writable(junit, markdown, out)
    if reliability is not None:
        from ..io.outputs import check_output_file

        if reliability.suffix.lower() != ".png":
            raise UsageError(f"--reliability {reliability}: the diagram is a PNG; name it .png")
        check_output_file(reliability, "--reliability", report_dir=out)
    if out is not None and _same_folder(
        out, pred, *[p for p in (gt, *(rater or ()), *(samples or ())) if p is not None]
    ):
        raise UsageError(f"--out {out} is an input folder; give the report a folder of its own")
    options = plan_options(locals())
    options.update(calibration_options(temperature, calibration_views, boundary_band, reqs))
    options.update(volume_options(boundary, nsd_tolerance, boundary_width, spacing, reqs))
    options.update(spatial_dims=spatial_dims, allow_affine_mismatch=allow_affine_mismatch)
    from ..commands import uncertainty as unc  # --uncertainty (DESIGN §11)

    options.update(unc.plan_keywords(uncertainty, qc_threshold, reqs))
    unc.check_risk_coverage(risk_coverage, options.get("uncertainty", ()), out)
    err = _stderr_console()
    with _progress(err, "evaluating") as tick:
        result = run(
            pred, gt, keep_going=keep_going, jobs=jobs, on_start=tick.start,
            on_image=tick.advance, **options,
        )  # fmt: skip

    if not result.images:  # --keep-going and every pair failed: no report of dashes
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
    summary = result.summary()
    if n_resamples:
        from ..io.statsfile import StatsTable

        table = StatsTable.from_result(result)
        from rich.markup import escape

        from ..commands.intervals import add_intervals, requirement_needs

        note = add_intervals(summary, table, n_resamples=n_resamples, seed=seed or 0,
                             baseline=base_table, common_only=common_images,
                             delta_required=requirement_needs(require or ())[1])  # fmt: skip
        if note:
            err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    if require:
        from ..commands.requirements import check_requirements

        summary["requirements"] = check_requirements(
            summary, require, baseline=base, allow_settings_change=allow_settings_change
        )
    inputs = [
        p
        for img in result.images
        for p in (img.pred_path, img.target_path, *getattr(img, "rater_paths", ()))
    ]
    outputs = [out / name for name in report.REPORT_FILES] if out is not None else []
    report.refuse_overwriting_inputs([*outputs, junit, markdown, reliability, risk_coverage],
                                     [*inputs, baseline])  # fmt: skip
    gate_written = False
    if out is not None:
        folders = {}
        if heatmaps:
            from ..render.heatmap import HeatmapOptions, worst_images_heatmaps

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
    if output_format is OutputFormat.json:
        sys.stdout.write(report.summary_json(summary))
    else:
        console = _console()
        console.print(report.summary_table(summary))
        console.print(report.class_table(summary))
        if out is not None:
            console.print(f"reports written to {_text(out)}/", highlight=False)
    code = gate_outputs(
        summary, summary["requirements"], junit=junit, markdown=markdown,
        github_summary=github_summary, json_on_stdout=output_format is OutputFormat.json,
        written=gate_written,
    ) if (require or junit or markdown or github_summary) else 0  # fmt: skip
    for error in result.errors:
        sys.stderr.write(f"Error: {error['file']}: {error['message']}\n")
    if result.errors:
        raise typer.Exit(code=2)
    raise typer.Exit(code=code)


@app.command()
@handle_errors
def gate(
    summary_path: Annotated[
        Path, typer.Argument(metavar="SUMMARY", help="A summary.json written by klseg evaluate.")
    ],
    require: RequireOpt = None,
    baseline: BaselineOpt = None,
    allow_settings_change: AllowSettingsOpt = False,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    github_summary: GithubSummaryOpt = False,
    output_format: Annotated[
        OutputFormat,
        typer.Option("--format", help="table: a rich table; json: the results on stdout."),
    ] = OutputFormat.table,
    bootstrap: BootstrapOpt = None,
    seed: SeedOpt = None,
    common_images: CommonImagesOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check requirements against a saved summary.json, without reading any map.

    Without --require, the requirements stored in the summary (those its evaluate run
    checked) are checked again. low(), high() and delta() are recomputed from the stats.npz
    beside the summary (and beside the --baseline), with the resamples and seed evaluate
    used unless given. Exit 0 when all hold, 1 when one fails, 2 on a usage or input error.

    Example:

        klseg gate report/summary.json --require "miou_pooled >= 0.7"
    """
    from ..commands.requirements import check_requirements, load_summary
    from ..render.report import summary_json

    _check_outputs(None, (), [summary_path, baseline], junit=junit, markdown=markdown)
    _check_paths_writable(junit, markdown)
    summary = load_summary(summary_path)
    if not require:
        stored = summary.get("requirements") or []
        require = [str(r["expr"]) for r in stored if isinstance(r, dict) and "expr" in r]
        if not require:
            raise UsageError(f"{summary_path} stores no requirements; pass at least one --require")
    base = load_summary(baseline) if baseline is not None else None
    from ..commands.intervals import add_intervals, requirement_needs, stats_of

    saved = summary.get("bootstrap") or {}
    needs_ci, needs_delta = requirement_needs(require)
    if bootstrap is None and (needs_ci or needs_delta):
        bootstrap = saved.get("resamples")  # the intervals as evaluate computed them
    seed = saved.get("seed", 0) if seed is None else seed
    n_resamples, base_table = _bootstrap_plan(require, bootstrap, baseline, base)
    if n_resamples:
        saved_ci = summary.get("dataset_ci")
        required = "delta()" if needs_delta else (None if saved_ci else "low()/high()")
        table = stats_of(summary_path, summary, required=required)
        if table is not None:  # else the intervals saved by evaluate --bootstrap are used
            note = add_intervals(summary, table, n_resamples=n_resamples, seed=seed,
                                 baseline=base_table, common_only=common_images,
                                 delta_required=needs_delta)  # fmt: skip
            if note:
                sys.stderr.write(f"warning: {note}\n")
    rows = check_requirements(
        summary, require, baseline=base, allow_settings_change=allow_settings_change
    )
    json_out = output_format is OutputFormat.json
    code = gate_outputs(summary, rows, junit=junit, markdown=markdown,
                        github_summary=github_summary, json_on_stdout=json_out)  # fmt: skip
    if json_out:
        sys.stdout.write(summary_json({"passed": code == 0, "requirements": rows}))
    raise typer.Exit(code=code)


class RankBy(str, Enum):
    kl = "kl"
    miou = "miou"


@app.command()
@handle_errors
def compare(
    a: Annotated[Path, typer.Argument(metavar="A", help="Model A's maps: a file or a folder.")],
    b: Annotated[Path, typer.Argument(metavar="B", help="Model B's maps of the same images.")],
    gt: Annotated[
        Optional[Path],
        typer.Argument(metavar="GT", help="Targets (optional): both models' metrics and Δ."),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Write compare.csv, compare.json here.")
    ] = None,
    output_format: Annotated[
        OutputFormat,
        typer.Option("--format", help="table: rich tables; json: compare JSON on stdout."),
    ] = OutputFormat.table,
    top: Annotated[
        int, typer.Option("--top", metavar="K", help="With GT: list the K images B does worst.")
    ] = 5,
    rank_by: Annotated[
        RankBy, typer.Option("--rank-by", help="With GT: rank images by Δkl or Δmiou.")
    ] = RankBy.kl,
    bootstrap: BootstrapOpt = None,
    seed: SeedOpt = None,
    require: Annotated[
        Optional[list[str]],
        typer.Option(
            "--require",
            metavar="EXPR",
            help="Gate on compare names, e.g. 'js_pooled <= 0.01', "
            "'agreement_pooled >= 0.95', 'delta(miou_image_mean) >= 0' (with GT).",
        ),
    ] = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    github_summary: GithubSummaryOpt = False,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Images compared in parallel (processes).")
    ] = 1,
    classes: ClassesOpt = None,
    ignore_index: IgnoreOpt = None,
    smoothing: SmoothingOpt = 0.0,
    input_kind: InputOpt = InputKind.probs,
    eps: EpsOpt = DEFAULT_EPS,
    log_base: LogBaseOpt = "e",
    layout: LayoutOpt = None,
    soft_gt: SoftGtOpt = False,
    renormalize: RenormalizeOpt = False,
    allow_missing: AllowMissingOpt = False,
    pred_suffix: PredSuffixOpt = "",
    gt_suffix: GtSuffixOpt = "",
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    chunk_pixels: ChunkOpt = 1 << 15,
    label_map: LabelMapOpt = None,
    reduce_zero_label: ReduceZeroOpt = False,
    exclude_class: ExcludeClassOpt = None,
    timeout: TimeoutOpt = None,
    strict_zarr: StrictZarrOpt = False,
    uncertainty: Annotated[
        Optional[list[str]],
        typer.Option(
            "--uncertainty",
            metavar="SCORE[,SCORE]",
            help="With GT: both models' failure detection (auroc_entropy_pooled ...) and "
            "its paired difference.",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Compare two models' maps of the same images: KL both ways, JS, argmax agreement.

    With GT, also both models' metrics side by side, their paired differences B − A (with
    --bootstrap intervals) and the images where B does worst.

    Example:

        klseg compare preds_a/ preds_b/ labels/ --bootstrap 1000 --out cmp/
    """
    from ..commands.compare import check_compare_names
    from ..commands.compare import compare_models as run
    from ..commands.intervals import resamples_for
    from ..render.compare_report import COMPARE_FILES, print_compare, write_compare_reports
    from ..render.report import check_out_dir, refuse_overwriting_inputs

    check_compare_names(require or (), with_target=gt is not None)
    n_resamples = resamples_for(bootstrap, require or ())
    _check_paths_writable(junit, markdown)
    if top < 0:
        raise UsageError(f"--top must be 0 or more, got {top}")
    if out is not None:
        check_out_dir(out)
    options = plan_options(locals())
    if uncertainty:
        from ..commands.uncertainty import plan_keywords

        if gt is None:
            raise UsageError("--uncertainty in compare needs GT (errors need a target)")
        options.update(plan_keywords(uncertainty, None))
    err = _stderr_console()
    with _progress(err, "comparing") as tick:
        result = run(a, b, gt, jobs=jobs, on_start=tick.start, on_image=tick.advance, **options)
    for path in result.only_in_b:
        err.print(f"[yellow]warning:[/] {path}: no map of A with this stem; skipped",
                  highlight=False)  # fmt: skip
    for path in result.only_in_a:
        err.print(f"[yellow]warning:[/] {path}: no map of B with this stem; left out",
                  highlight=False)  # fmt: skip
    for path in result.missing_predictions:
        err.print(f"[yellow]warning:[/] {path}: target has no prediction; left out",
                  highlight=False)  # fmt: skip
    summary = result.summary(n_resamples=n_resamples, seed=seed or 0, top_k=top,
                             rank_by=rank_by.value)  # fmt: skip
    if require:
        from ..commands.requirements import check_requirements

        summary["requirements"] = check_requirements(summary, require)
    inputs = [p for img in result.images for p in img.files]
    outputs = [out / name for name in COMPARE_FILES] if out is not None else []
    refuse_overwriting_inputs([*outputs, junit, markdown], inputs)
    if out is not None:
        write_compare_reports(summary, out)
    if output_format is OutputFormat.json:
        from ..render.report import summary_json

        sys.stdout.write(summary_json(summary))
    else:
        console = _console()
        print_compare(summary, console)
        if out is not None:
            console.print(f"reports written to {out}/", highlight=False)
    code = gate_outputs(
        None, summary["requirements"], junit=junit, markdown=markdown,
        github_summary=github_summary, json_on_stdout=output_format is OutputFormat.json,
    ) if (require or junit or markdown or github_summary) else 0  # fmt: skip
    raise typer.Exit(code=code)


@app.command()
@handle_errors
def calibrate(
    pred: Annotated[
        Path, typer.Argument(metavar="PRED", help="Prediction map file, or a folder of them.")
    ],
    gt: Annotated[
        Path, typer.Argument(metavar="GT", help="Target mask file, or a folder of them.")
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write calibration.json and reliability.png here."),
    ] = None,
    write: Annotated[
        Optional[Path],
        typer.Option(
            "--write",
            metavar="DIR",
            help="Write the calibrated maps here (same names, format and layout).",
        ),
    ] = None,
    holdout: Annotated[
        Optional[float],
        typer.Option(
            "--holdout",
            metavar="F",
            help="Leave this share of the images (a seeded choice) out of the fit and "
            "report before/after on them.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --holdout split.")] = 0,
    classes: ClassesOpt = None,
    ignore_index: IgnoreOpt = None,
    smoothing: SmoothingOpt = 0.0,
    input_kind: InputOpt = InputKind.probs,
    eps: EpsOpt = DEFAULT_EPS,
    log_base: LogBaseOpt = "e",
    layout: LayoutOpt = None,
    soft_gt: SoftGtOpt = False,
    renormalize: RenormalizeOpt = False,
    allow_missing: AllowMissingOpt = False,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Images evaluated in parallel (before/after).")
    ] = 1,
    pred_suffix: PredSuffixOpt = "",
    gt_suffix: GtSuffixOpt = "",
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    chunk_pixels: ChunkOpt = 1 << 15,
    label_map: LabelMapOpt = None,
    reduce_zero_label: ReduceZeroOpt = False,
    exclude_class: ExcludeClassOpt = None,
    timeout: TimeoutOpt = None,
    strict_zarr: StrictZarrOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fit a temperature T that minimises the pooled KL(target || softmax(log p / T)).

    The relative-entropy optimization over a temperature (post-hoc calibration), exact over
    every valid pixel. Prints T, the passes over the data, and metrics before and after;
    accuracy and IoU do not change. Apply T later with evaluate --temperature.

    Example:

        klseg calibrate val/preds val/labels --holdout 0.3 --out calib/
    """

    from ..commands.calibrate import calibrate as run_calibration
    from ..render import report

    if out is not None:
        from ..io.outputs import check_out_dir

        check_out_dir(out)
    if write is not None and write.exists() and not write.is_dir():
        raise UsageError(f"--write {write} is an existing file; give a folder")
    options = plan_options(locals())
    err = _stderr_console()

    def on_pass(p) -> None:
        err.print(f"pass {len(run_passes) + 1}: T = {p.temperature:.6g}, mean KL "
                  f"{p.kl_mean:.6g}", highlight=False)  # fmt: skip
        run_passes.append(p)

    run_passes: list = []
    run = run_calibration(pred, gt, holdout=holdout, seed=seed, jobs=jobs, on_pass=on_pass,
                          write=write, **options)  # fmt: skip
    console = _console()
    fit = run.fit
    bound = " (at the search bound: the optimum lies beyond)" if fit.at_bound else ""
    console.print(
        f"T = {fit.temperature:.6g}{bound}  ({fit.n_passes} pass"
        f"{'es' if fit.n_passes != 1 else ''} over "
        f"{fit.n_valid:,} valid pixels)",
        highlight=False,
    )
    sizes = ", ".join(
        f"{p.name}: {len(p.pairs)} image{'s' if len(p.pairs) != 1 else ''}" for p in run.parts
    )
    console.print(sizes, highlight=False)
    for part in run.parts:
        from ..render.calibration_report import before_after_table

        console.print(before_after_table(run, part))
    inputs = [p for part in run.parts for pair in part.pairs for p in (pair.pred, pair.target)]
    if out is not None:
        from ..render.calibration_report import CALIBRATE_FILES

        report.refuse_overwriting_inputs([out / n for n in CALIBRATE_FILES], inputs)
    if write is not None:
        from dataclasses import replace

        from ..commands.calibrated_maps import write_calibrated

        pairs = [pair for part in run.parts for pair in part.pairs]
        pairs.sort(key=lambda p: p.stem)
        written = write_calibrated(
            pairs, replace(run.settings, temperature=fit.temperature), run.read, write
        )
        console.print(f"{len(written)} calibrated maps written to {write}/", highlight=False)
    if out is not None:  # after the maps: a map that cannot be written leaves no report
        from ..render.calibration_report import write_calibration_outputs

        write_calibration_outputs(run, out)
        console.print(f"calibration written to {out}/", highlight=False)


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


@app.command()
@handle_errors
def heatmap(
    pred: Annotated[
        Path, typer.Argument(metavar="PRED", help="Prediction map file, or a folder of them.")
    ],
    gt: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="GT", help="Target file or folder (not needed for entropy and confidence)."
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
    spatial_dims: Annotated[
        int,
        typer.Option(
            "--spatial-dims",
            help="3: .npy/.npz files are volumes (X,Y,Z[,C]); NIfTI files always are.",
            min=2,
            max=3,
        ),
    ] = 2,
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
        ),
    ] = None,
    classes: ClassesOpt = None,
    ignore_index: IgnoreOpt = None,
    smoothing: SmoothingOpt = 0.0,
    input_kind: InputOpt = InputKind.probs,
    eps: EpsOpt = DEFAULT_EPS,
    log_base: LogBaseOpt = "e",
    layout: LayoutOpt = None,
    soft_gt: SoftGtOpt = False,
    renormalize: RenormalizeOpt = False,
    allow_missing: AllowMissingOpt = False,
    pred_suffix: PredSuffixOpt = "",
    gt_suffix: GtSuffixOpt = "",
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    chunk_pixels: ChunkOpt = 1 << 15,
    label_map: LabelMapOpt = None,
    reduce_zero_label: ReduceZeroOpt = False,
    exclude_class: ExcludeClassOpt = None,
    timeout: TimeoutOpt = None,
    strict_zarr: StrictZarrOpt = False,
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
    from ..io.volumes import SliceView
    from ..render.heatmap import HeatmapOptions, make_heatmaps

    options = HeatmapOptions(
        metric=metric.value, cmap=cmap, vmin=vmin, vmax=vmax, log=log, ignore_color=ignore_color,
        overlay=overlay, alpha=alpha, colorbar=colorbar, panel=panel, max_side=max_side,
        reduce=reduce.value, view=SliceView.parse(volume_slice, montage), threshold=threshold,
    )  # fmt: skip
    plan = plan_options(locals())
    if uncertainty or threshold is not None:  # --metric uncertainty-error's score
        from ..commands.uncertainty import heatmap_keywords

        plan.update(heatmap_keywords(metric.value, uncertainty, threshold))
    plan.update(spatial_dims=spatial_dims, allow_affine_mismatch=allow_affine_mismatch)
    _check_outputs(None, (), [pred, gt, overlay, *(rater or ())], out=out, raw=raw)
    err = _stderr_console()
    if against is not None and gt is not None:
        raise UsageError("--against compares two predictions: give PRED and --against B, no GT")
    if rater and (gt is not None or against is not None):
        raise UsageError("--rater takes the place of GT: give PRED and --rater DIR twice or more")
    with _progress(err, "rendering") as tick:
        try:
            if rater:
                from ..commands.raters import make_rater_heatmaps

                written = make_rater_heatmaps(
                    pred, rater, out, options, raw=raw, on_start=tick.start,
                    on_image=tick.advance, **plan,
                )  # fmt: skip
            elif against is not None:
                from ..commands.compare import make_pair_heatmaps

                written = make_pair_heatmaps(
                    pred, against, out, options, raw=raw, on_start=tick.start,
                    on_image=tick.advance, **plan,
                )  # fmt: skip
            else:
                written = make_heatmaps(
                    pred, gt, out, options, raw=raw, on_start=tick.start,
                    on_image=tick.advance, **plan,
                )  # fmt: skip
        except OSError as error:  # inputs raise ReadError: an OS error here is an output's
            from ..io.atomic import output_error

            raise output_error(error.filename or out, error) from None
    for path in written:
        err.print(f"wrote {_text(path)}", highlight=False)


class _Ticker:
    """Progress callbacks for the library: a bar on stderr when it is a terminal; in CI logs
    (stderr not a terminal) a plain line every ``every`` seconds once a run is that long."""

    every = 5.0

    def __init__(self, console, description: str) -> None:
        self.console, self.description = console, description
        self.progress = self.task = None
        self.total = self.done = 0
        self.started = self.last = 0.0

    def start(self, total: int) -> None:
        import time

        self.total, self.done = total, 0
        self.started = self.last = time.monotonic()
        if total < 2 or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.progress = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=True,
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=total)

    def advance(self, _pair=None) -> None:
        import time

        self.done += 1
        if self.progress is not None:
            self.progress.advance(self.task)
            return
        now = time.monotonic()
        if self.total >= 2 and now - self.last >= self.every:
            self.last = now
            sys.stderr.write(
                f"{self.description}: {self.done}/{self.total} images, "
                f"{now - self.started:.0f} s elapsed\n"
            )
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def _progress(console, description: str) -> _Ticker:
    return _Ticker(console, description)


@app.command()
@handle_errors
def info(
    file: Annotated[str, typer.Argument(help="A prediction map or a target mask (or a URL).")],
    target: Annotated[
        Optional[str],
        typer.Option("--target", help="Target mask whose (H, W) decides the layout."),
    ] = None,
    layout: LayoutOpt = None,
    classes: ClassesOpt = None,
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    timeout: TimeoutOpt = None,
    strict_zarr: StrictZarrOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shape, dtype, detected layout, value range and sum check of one file.

    What to run when klseg rejects a file.

    Example:

        klseg info preds/frankfurt_000001.npy
    """
    from rich.table import Table

    from ..commands.info import inspect_file
    from ..engine.local import parse_classes

    names = parse_classes(classes)
    facts = inspect_file(
        file,
        target=target,
        layout=layout.value if layout else None,
        num_classes=len(names) or None,
        npz_key=npz_key,
        max_pixels=max_pixels,
        timeout=timeout,
        strict_zarr=strict_zarr,
    )
    table = Table(title=_text(file), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in facts.items():
        table.add_row(_text(key), _text(value))
    _console().print(table)


def _text(value) -> str:
    """Text from files (paths, class names) for rich: markup escaped, controls visible."""
    from rich.markup import escape

    from ..render.report import printable

    return escape(printable(str(value)))


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)  # cleanup runs, as for Ctrl-C
    app()
