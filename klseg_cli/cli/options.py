"""The options the commands share, declared once: the ``Annotated`` aliases every command
reuses, their choices, and how they become the library's keywords (``plan_options``)."""

from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from ..defaults import DEFAULT_EPS
from ..errors import UsageError


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class InputKind(str, Enum):
    probs = "probs"
    logits = "logits"


class Layout(str, Enum):
    hwc = "hwc"
    chw = "chw"


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


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://b/k, https://h/p (Path makes it s3:/b/k)


def local_only(value):
    """An argument or option that takes local files (heatmap, compare and calibrate inputs,
    gate's SUMMARY, --baseline, --rater, --samples): a URL is one clear line, not a path that
    Path() mangled into 'https:/host/...' and then called missing."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item is not None and _URL.match(str(item)):
            url = re.sub(r"^([^:/]+):/(?!/)", r"\1://", str(item))  # as the user typed it
            raise typer.BadParameter(
                f"{url}: a local file or folder is needed here; URLs (s3://, https://, ...) "
                "are read as PRED and GT of klseg evaluate, and by klseg info"
            )
    return value


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

SpatialDimsOpt = Annotated[
    int,
    typer.Option(
        "--spatial-dims",
        help="3: .npy/.npz files are volumes (X,Y,Z[,C]); NIfTI files always are.",
        min=2,
        max=3,
    ),
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
    typer.Option(
        "--baseline",
        help="An earlier summary.json that 'baseline' refers to.",
        callback=local_only,
    ),
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


PLAN_OPTIONS = (
    "classes", "ignore_index", "smoothing", "input_kind", "eps", "log_base", "layout",
    "soft_gt", "renormalize", "allow_missing", "pred_suffix", "gt_suffix", "npz_key",
    "max_pixels", "chunk_pixels", "label_map", "reduce_zero_label", "exclude_class",
    "timeout", "strict_zarr",
)  # fmt: skip
"""The options every computing command shares (parameters of ``evaluation.plan``)."""


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


@dataclass(frozen=True)
class EvaluationOptions:
    """The options every computing command shares (evaluate, compare, calibrate, heatmap),
    declared once: a field per option, named as the option and as ``engine.local.plan``'s
    keyword, typed with its ``Annotated`` alias. ``evaluation_options`` puts them in a
    command's signature; the command receives them as one ``shared`` value."""

    classes: ClassesOpt = None
    ignore_index: IgnoreOpt = None
    smoothing: SmoothingOpt = 0.0
    input_kind: InputOpt = InputKind.probs
    eps: EpsOpt = DEFAULT_EPS
    log_base: LogBaseOpt = "e"
    layout: LayoutOpt = None
    soft_gt: SoftGtOpt = False
    renormalize: RenormalizeOpt = False
    allow_missing: AllowMissingOpt = False
    pred_suffix: PredSuffixOpt = ""
    gt_suffix: GtSuffixOpt = ""
    npz_key: NpzKeyOpt = None
    max_pixels: MaxPixelsOpt = 1 << 31
    chunk_pixels: ChunkOpt = 1 << 15
    label_map: LabelMapOpt = None
    reduce_zero_label: ReduceZeroOpt = False
    exclude_class: ExcludeClassOpt = None
    timeout: TimeoutOpt = None
    strict_zarr: StrictZarrOpt = False

    def plan(self) -> dict:
        """``engine.local.plan``'s keywords."""
        return plan_options(vars(self))


FIRST_BLOCK = "allow_missing"
"""``--help`` lists the shared options up to this one, then the command's ``inside`` ones,
then the rest."""
LATE = ("timeout", "strict_zarr")
"""Shared options that ``--help`` lists later, just before the command's ``late_before``
option (the remote-read options came after each command's own)."""


def evaluation_options(*, inside: tuple[str, ...] = (), late_before: str = "debug"):
    """Give a command the shared options: its ``shared: EvaluationOptions`` parameter becomes
    the options themselves in the signature Typer reads (the command's ``inside`` options
    listed among them, and the ``LATE`` ones before its ``late_before`` option, as ``--help``
    has always shown them), and the command is called with them gathered into ``shared``."""
    hints = get_type_hints(EvaluationOptions, include_extras=True)
    names = [f.name for f in fields(EvaluationOptions)]
    split = names.index(FIRST_BLOCK) + 1

    def decorate(func):
        own = inspect.signature(func, eval_str=True).parameters
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        shared = [
            inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name])
            for f in fields(EvaluationOptions)
        ]
        late = [p for p in shared if p.name in LATE]
        shared = [p for p in shared if p.name not in LATE]
        params = []
        for p in own.values():
            if p.name == late_before:
                params += late
            if p.name == "shared":
                params += [*shared[:split], *(own[n] for n in inside), *shared[split:]]
            elif p.name not in inside:
                params.append(p)

        @functools.wraps(func)
        def command(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            return func(**kwargs, shared=EvaluationOptions(**values))

        command.__signature__ = inspect.Signature(params)
        return command

    return decorate
