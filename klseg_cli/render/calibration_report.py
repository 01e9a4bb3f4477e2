"""Presentation of calibration: the before/after table, calibration.json, reliability files."""

from __future__ import annotations

from pathlib import Path

from .formats import fmt, summary_json
from .reliability import reliability_csv, reliability_png, stats_bins, write_reliability_png

CALIBRATE_FILES = ("calibration.json", "reliability.png")
EVALUATE_FILES = ("reliability.png", "calibration.csv")


def before_after_table(run, part):
    """A rich table: metric, before, after, change — for one part of the images."""
    from rich import box
    from rich.table import Table

    unit = run.settings.unit
    n_valid = part.before.total.n_valid
    n = len(part.pairs)
    title = f"{part.name} part: {n} image{'s' if n != 1 else ''}, {n_valid:,} valid pixels"
    table = Table(title=title, caption=f"pooled over the part's pixels; kl, ce in {unit}",
                  box=box.SIMPLE_HEAD, min_width=52)  # fmt: skip
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for name, (before, after) in part.table().items():
        change = after - before
        table.add_row(name, fmt(before), fmt(after), fmt(change) if change else "0")
    return table


def write_calibration_outputs(run, out: Path) -> list[Path]:
    """``calibration.json`` and ``reliability.png`` (before | after, per part) into ``out``,
    published as one unit (``outputs.publish_report``)."""
    from ..io.outputs import publish_report

    t = run.temperature
    panels = []
    for part in run.parts:
        label = f"{part.name}, " if len(run.parts) > 1 else ""
        panels.append((stats_bins(part.before.total), f"{label}before (T = 1)"))
        panels.append((stats_bins(part.after.total), f"{label}after (T = {t:.4g})"))
    files = {"reliability.png": reliability_png(panels),
             "calibration.json": summary_json(run.as_json())}  # fmt: skip
    return publish_report(Path(out), files)


def reliability_files(result) -> dict[str, str | bytes]:
    """``reliability.png`` and ``calibration.csv`` of an evaluation, for its report."""
    bins = stats_bins(result.total)
    return {"reliability.png": reliability_png([(bins, _title(result))]),
            "calibration.csv": reliability_csv(*bins)}  # fmt: skip


def _title(result) -> str:
    t = result.settings.temperature
    return "reliability" + (f" (T = {t:.4g})" if t != 1.0 else "")


def write_reliability_outputs(result, png: Path) -> Path:
    """``--reliability FILE.png``: the evaluation's reliability diagram."""
    return write_reliability_png(png, [(stats_bins(result.total), _title(result))])
