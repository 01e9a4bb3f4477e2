"""The ``klseg`` command: parse options, call the library, render, exit.

No maths and no file parsing here. Library errors (``KlsegError``) become one line on stderr
and exit code 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import functools
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .defaults import DEFAULT_EPS
from .errors import KlsegError, UsageError

app = typer.Typer(
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


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line on stderr and return the Exit to raise."""
    sys.stderr.write(f"Error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    return typer.Exit(code=code)


def handle_errors(func):
    """Turn KlsegError into one stderr line + exit 2, Ctrl-C into exit 130 (``--debug``: raise)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return func(*args, **kwargs)
        except KlsegError as err:
            if debug:
                raise
            raise fail(str(err), err.exit_code) from None
        except KeyboardInterrupt:
            if debug:
                raise
            raise fail("interrupted; no report was written", 130) from None

    return wrapper


def parse_log_base(text: str) -> float:
    if text.strip().lower() == "e":
        return math.e
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--log-base must be 'e' or a number such as 2, got {text!r}") from None
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


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]
ClassesOpt = Annotated[
    Optional[str],
    typer.Option("--classes", help="Class names: 'road,car,...' or a file with one name a line."),
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
        "--ignore-index", metavar="N", help="Label value that counts nowhere (repeatable)."
    ),
]
SmoothingOpt = Annotated[
    float, typer.Option("--smoothing", help="Label smoothing ε of hard targets.")
]
InputOpt = Annotated[InputKind, typer.Option("--input", help="Maps hold probabilities or logits.")]
EpsOpt = Annotated[float, typer.Option("--eps", help="Clip p at eps before log p.")]
LogBaseOpt = Annotated[str, typer.Option("--log-base", help="'e' (nats) or 2 (bits).")]
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


def gate_outputs(summary, rows, *, junit, markdown, github_summary, json_on_stdout) -> int:
    """Print and write the requirement results; returns the exit code they call for (0 or 1)."""
    import os

    from rich.console import Console

    from . import report
    from .atomic import atomic_path

    if rows:
        Console(stderr=json_on_stdout).print(report.requirements_table(rows))
    if junit is not None:
        with atomic_path(junit) as tmp:
            tmp.write_text(report.junit_xml(rows), encoding="utf-8")
    text = report.markdown_report(summary, rows)
    if markdown is not None:
        with atomic_path(markdown) as tmp:
            tmp.write_text(text, encoding="utf-8")
    if github_summary:
        target = os.environ.get("GITHUB_STEP_SUMMARY")
        if target:
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(text)
        else:
            sys.stderr.write("warning: --github-summary: GITHUB_STEP_SUMMARY is not set\n")
    if os.environ.get("GITHUB_ACTIONS") == "true":
        stream = sys.stderr if json_on_stdout else sys.stdout
        for line in report.github_annotations(rows):
            stream.write(line + "\n")
        stream.flush()
    return 1 if any(not r["passed"] for r in rows) else 0


def _check_paths_writable(*paths) -> None:
    for path in paths:
        if path is not None and path.is_dir():
            raise UsageError(f"{path} is a folder; give a file name")


PLAN_OPTIONS = (
    "classes", "ignore_index", "smoothing", "input_kind", "eps", "log_base", "layout",
    "soft_gt", "renormalize", "allow_missing", "pred_suffix", "gt_suffix", "npz_key",
    "max_pixels", "chunk_pixels",
)  # fmt: skip
"""The options every computing command shares (parameters of ``evaluation.plan``)."""


def plan_options(params: dict) -> dict:
    """``evaluation.plan`` keywords from a command's parameters (pass ``locals()``)."""
    opts = {name: params[name] for name in PLAN_OPTIONS}
    opts["ignore_index"] = (255,) if opts["ignore_index"] is None else tuple(opts["ignore_index"])
    opts["input_kind"] = opts["input_kind"].value
    opts["log_base"] = parse_log_base(opts["log_base"])
    opts["layout"] = opts["layout"].value if opts["layout"] else None
    return opts


@app.command()
@handle_errors
def evaluate(
    pred: Annotated[
        Path, typer.Argument(metavar="PRED", help="Prediction map file, or a folder of them.")
    ],
    gt: Annotated[
        Path, typer.Argument(metavar="GT", help="Target mask file, or a folder of them.")
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write per_image.csv, per_class.csv, summary.json here."),
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
        int,
        typer.Option(
            "--jobs",
            "-j",
            help="Images evaluated in parallel (threads with the klseg[fast] kernel, else "
            "processes); results are identical for any value.",
        ),
    ] = 1,
    pred_suffix: PredSuffixOpt = "",
    gt_suffix: GtSuffixOpt = "",
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    chunk_pixels: ChunkOpt = 1 << 15,
    require: RequireOpt = None,
    baseline: BaselineOpt = None,
    allow_settings_change: AllowSettingsOpt = False,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    github_summary: GithubSummaryOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate probability maps against targets: KL, CE, JS, entropy, Brier, IoU, Dice, ECE.

    Example:

        klseg evaluate preds/ labels/ --classes classes.txt --out report/
    """
    from . import report
    from .evaluation import evaluate as run
    from .requirements import check_names, load_summary

    check_names(require or ())  # a malformed or misnamed gate fails before any work
    base = load_summary(baseline) if baseline is not None else None
    _check_paths_writable(junit, markdown)
    if heatmaps and out is None:
        raise UsageError("--heatmaps needs --out DIR (they go to DIR/heatmaps/)")
    if out is not None:
        report.check_out_dir(out)
    options = plan_options(locals())
    err = _stderr_console()
    with _progress(err, "evaluating") as tick:
        result = run(
            pred, gt, keep_going=keep_going, jobs=jobs, on_start=tick.start,
            on_image=tick.advance, **options,
        )  # fmt: skip

    for path in result.unpaired_predictions:
        err.print(f"[yellow]warning:[/] {path}: prediction has no target; skipped", highlight=False)
    for path in result.missing_predictions:
        err.print(
            f"[yellow]warning:[/] {path}: target has no prediction; left out", highlight=False
        )
    summary = result.summary()
    if require:
        from .requirements import check_requirements

        summary["requirements"] = check_requirements(
            summary, require, baseline=base, allow_settings_change=allow_settings_change
        )
    inputs = [p for img in result.images for p in (img.pred_path, img.target_path)]
    outputs = [out / name for name in report.REPORT_FILES] if out is not None else []
    report.refuse_overwriting_inputs([*outputs, junit, markdown], [*inputs, baseline])
    if out is not None:
        if heatmaps:
            from .heatmap import HeatmapOptions, worst_images_heatmaps

            worst_images_heatmaps(
                result, out / "heatmaps", heatmaps, HeatmapOptions(metric="kl", colorbar=True)
            )
        report.write_reports(summary, out)
    if output_format is OutputFormat.json:
        sys.stdout.write(report.summary_json(summary))
    else:
        from rich.console import Console

        console = Console()
        console.print(report.summary_table(summary))
        console.print(report.class_table(summary))
        if out is not None:
            console.print(f"reports written to {out}/", highlight=False)
    code = gate_outputs(
        summary, summary["requirements"], junit=junit, markdown=markdown,
        github_summary=github_summary, json_on_stdout=output_format is OutputFormat.json,
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
    debug: DebugOpt = False,
) -> None:
    """Check requirements against a saved summary.json, without recomputing anything.

    Exit 0 when all hold, 1 when one fails, 2 on a usage or input error.

    Example:

        klseg gate report/summary.json --require "miou_pooled >= 0.7"
    """
    from .requirements import check_requirements, load_summary

    if not require:
        raise UsageError("klseg gate needs at least one --require")
    _check_paths_writable(junit, markdown)
    from .report import refuse_overwriting_inputs

    refuse_overwriting_inputs([junit, markdown], [summary_path, baseline])
    summary = load_summary(summary_path)
    base = load_summary(baseline) if baseline is not None else None
    rows = check_requirements(
        summary, require, baseline=base, allow_settings_change=allow_settings_change
    )
    code = gate_outputs(summary, rows, junit=junit, markdown=markdown,
                        github_summary=github_summary, json_on_stdout=False)  # fmt: skip
    raise typer.Exit(code=code)


class Metric(str, Enum):
    kl = "kl"
    ce = "ce"
    js = "js"
    entropy = "entropy"
    error = "error"
    confidence = "confidence"


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
        str, typer.Option("--ignore-color", help="Colour of ignored pixels.")
    ] = "#808080",
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
    debug: DebugOpt = False,
) -> None:
    """Draw a per-pixel metric (KL by default) as a colour PNG: where divergence sits.

    Example:

        klseg heatmap preds/x.npy labels/x.png -o x_kl.png --colorbar
    """
    from .heatmap import HeatmapOptions, make_heatmaps

    options = HeatmapOptions(
        metric=metric.value, cmap=cmap, vmin=vmin, vmax=vmax, log=log, ignore_color=ignore_color,
        overlay=overlay, alpha=alpha, colorbar=colorbar, panel=panel, max_side=max_side,
        reduce=reduce.value,
    )  # fmt: skip
    plan = plan_options(locals())
    err = _stderr_console()
    with _progress(err, "rendering") as tick:
        written = make_heatmaps(
            pred, gt, out, options, raw=raw, on_start=tick.start, on_image=tick.advance, **plan
        )
    for path in written:
        err.print(f"wrote {path}", highlight=False)


class _Ticker:
    """Progress callbacks for the library: a bar on stderr only when it is a terminal."""

    def __init__(self, console, description: str) -> None:
        self.console, self.description = console, description
        self.progress = self.task = None

    def start(self, total: int) -> None:
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
        if self.progress is not None:
            self.progress.advance(self.task)

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
    file: Annotated[Path, typer.Argument(help="A prediction map or a target mask.")],
    target: Annotated[
        Optional[Path],
        typer.Option("--target", help="Target mask whose (H, W) decides the layout."),
    ] = None,
    layout: LayoutOpt = None,
    classes: ClassesOpt = None,
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    debug: DebugOpt = False,
) -> None:
    """Shape, dtype, detected layout, value range and sum check of one file.

    What to run when klseg rejects a file.

    Example:

        klseg info preds/frankfurt_000001.npy
    """
    from rich.console import Console
    from rich.table import Table

    from .evaluation import parse_classes
    from .fileinfo import inspect_file

    names = parse_classes(classes)
    facts = inspect_file(
        file,
        target=target,
        layout=layout.value if layout else None,
        num_classes=len(names) or None,
        npz_key=npz_key,
        max_pixels=max_pixels,
    )
    table = Table(title=str(file), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in facts.items():
        table.add_row(key, str(value))
    Console().print(table)


def main() -> None:
    app()
