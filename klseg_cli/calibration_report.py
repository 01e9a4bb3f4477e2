"""Presentation of calibration: the before/after table, calibration.json, reliability files."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path
from .reliability import reliability_csv, stats_bins, write_reliability_png
from .report import fmt, make_out_dir, summary_json, write_atomic

CALIBRATE_FILES = ("calibration.json", "reliability.png")
EVALUATE_FILES = ("reliability.png", "calibration.csv")


def before_after_table(run, part):
    """A rich table: metric, before, after, change — for one part of the images."""
    from rich import box
    from rich.table import Table

    unit = "bits" if run.settings.log_base == 2 else "nats"
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
    """``calibration.json`` and ``reliability.png`` (before | after, per part) into ``out``."""
    out = make_out_dir(Path(out))
    json_path = out / "calibration.json"
    write_atomic({json_path: summary_json(run.as_json())})
    t = run.temperature
    panels = []
    for part in run.parts:
        label = f"{part.name}, " if len(run.parts) > 1 else ""
        panels.append((stats_bins(part.before.total), f"{label}before (T = 1)"))
        panels.append((stats_bins(part.after.total), f"{label}after (T = {t:.4g})"))
    png = write_reliability_png(out / "reliability.png", panels)
    return [json_path, png]


def write_reliability_outputs(result, out: Path | None, png: Path | None) -> list[Path]:
    """``--reliability FILE.png`` and, with ``--out``, reliability.png + calibration.csv."""
    total = result.total
    bins = stats_bins(total)
    t = result.settings.temperature
    title = "reliability" + (f" (T = {t:.4g})" if t != 1.0 else "")
    written = []
    if png is not None:
        written.append(write_reliability_png(png, [(bins, title)]))
    if out is not None:
        out = make_out_dir(Path(out))
        written.append(write_reliability_png(out / "reliability.png", [(bins, title)]))
        with atomic_path(out / "calibration.csv") as tmp:
            tmp.write_text(reliability_csv(*bins), encoding="utf-8", newline="")
        written.append(out / "calibration.csv")
    return written
