"""Checks every command makes before any work: no output is an input, a report file or
another output; the files asked for can be written; a bootstrap has what it needs."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


def _bootstrap_plan(require, bootstrap, baseline, base):
    """(resamples, the baseline's StatsTable or None) for --bootstrap, low/high/delta."""
    from .intervals import requirement_needs, resamples_for, stats_of

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
    from ..render.formats import refuse_overwriting_inputs

    options = {"--" + k.replace("_", "-"): v for k, v in named.items()}
    check_distinct_outputs(options, report_dir, report_files)
    refuse_overwriting_inputs(list(options.values()), inputs)
