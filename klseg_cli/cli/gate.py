"""``klseg gate``: requirements checked against a saved summary.json, and the gate's
outputs (table, JUnit, Markdown, GitHub annotations) that evaluate and compare share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..commands.preflight import _bootstrap_plan, _check_outputs, _check_paths_writable
from ..commands.requirements import gate_files
from ..errors import UsageError
from .console import _console
from .errors import handle_errors
from .options import (
    AllowSettingsOpt,
    BaselineOpt,
    BootstrapOpt,
    CommonImagesOpt,
    DebugOpt,
    GithubSummaryOpt,
    JunitOpt,
    MarkdownOpt,
    OutputFormat,
    RequireOpt,
    SeedOpt,
    local_only,
)


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


@handle_errors
def gate(
    summary_path: Annotated[
        Path,
        typer.Argument(
            metavar="SUMMARY", help="A summary.json written by klseg evaluate.", callback=local_only
        ),
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
    from ..render.formats import summary_json

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
