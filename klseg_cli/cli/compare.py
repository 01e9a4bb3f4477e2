"""``klseg compare``."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..commands.preflight import _check_paths_writable
from ..errors import UsageError
from .console import _console, _progress, _stderr_console
from .errors import handle_errors
from .gate import gate_outputs
from .options import (
    BootstrapOpt,
    DebugOpt,
    EvaluationOptions,
    GithubSummaryOpt,
    JunitOpt,
    MarkdownOpt,
    OutputFormat,
    SeedOpt,
    evaluation_options,
    local_only,
)


class RankBy(str, Enum):
    kl = "kl"
    miou = "miou"


@handle_errors
@evaluation_options(late_before="uncertainty")
def compare(
    a: Annotated[
        Path,
        typer.Argument(
            metavar="A", help="Model A's maps: a file or a folder.", callback=local_only
        ),
    ],
    b: Annotated[
        Path,
        typer.Argument(metavar="B", help="Model B's maps of the same images.", callback=local_only),
    ],
    gt: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="GT",
            help="Targets (optional): both models' metrics and Δ.",
            callback=local_only,
        ),
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
    shared: EvaluationOptions = EvaluationOptions(),
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
    from ..render.formats import check_out_dir, refuse_overwriting_inputs

    check_compare_names(require or (), with_target=gt is not None)
    n_resamples = resamples_for(bootstrap, require or ())
    _check_paths_writable(junit, markdown)
    if top < 0:
        raise UsageError(f"--top must be 0 or more, got {top}")
    if out is not None:
        check_out_dir(out)
    options = shared.plan()
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
        from ..render.formats import summary_json

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
