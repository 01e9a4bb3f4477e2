"""Presentation: CSV and JSON reports (DESIGN §5) and rich terminal tables."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path

from ..core.stats import CALIBRATION_METRICS, CLASS_COLUMNS, IMAGE_COLUMNS
from .formats import (
    UNDEFINED,
    fmt,
    fmt_g,
    rows_csv,
    summary_json,
)

REPORT_FILES = (
    "per_image.csv", "per_class.csv", "summary.json", "confusion.csv", "per_image_class.csv",
    "stats.npz", "reliability.png", "calibration.csv",
)  # fmt: skip
"""Files every ``evaluate --out`` writes (``--uncertainty`` adds ``qc.csv``)."""


def confusion_csv(confusion, names) -> str:
    """The pooled confusion matrix: rows = target class, columns = predicted class."""
    return rows_csv(
        ({"target \\ predicted": name, **{n: int(v) for n, v in zip(names, row)}}
         for name, row in zip(names, confusion)),
        ("target \\ predicted", *names),
    )  # fmt: skip


EXTRA_COLUMNS = ("depth", "hd95", "assd", "nsd", "biou")
"""Columns appended to the CSV files when their rows hold them: a volume's depth, and the
boundary metrics of ``--boundary`` (boundary.BOUNDARY_METRICS)."""


def with_extra(rows, columns: tuple[str, ...]) -> tuple[str, ...]:
    """``columns`` plus those of EXTRA_COLUMNS (and RATER_METRICS, ``--rater``; the class
    rows' ``soft_dice``) that some row holds."""
    from ..core.raters import RATER_METRICS

    rows = list(rows)
    from ..core.uncertainty import image_columns  # --uncertainty

    extra = (*EXTRA_COLUMNS, *RATER_METRICS, *image_columns())
    return columns + tuple(c for c in extra if c not in columns and any(c in r for r in rows))


def report_files(summary: Mapping, result=None) -> dict[str, str | bytes]:
    """File name → content of a report. ``result`` (an EvaluationResult) adds the files
    that need more than the summary: ``confusion.csv``, ``per_image_class.csv`` and
    ``stats.npz`` (the per-image sums, see ``statsfile``). ``summary.json`` comes last."""
    from ..core.stats import IMAGE_CLASS_COLUMNS

    files: dict[str, str | bytes] = {
        "per_image.csv": rows_csv(summary["images"], with_extra(summary["images"], IMAGE_COLUMNS)),
        "per_class.csv": rows_csv(
            summary["classes"], with_extra(summary["classes"], CLASS_COLUMNS)
        ),
    }
    if result is not None:
        from ..io.statsfile import StatsTable, write_stats

        files["confusion.csv"] = confusion_csv(result.total.confusion, result.settings.names)
        rows = result.image_class_rows()
        files["per_image_class.csv"] = rows_csv(rows, with_extra(rows, IMAGE_CLASS_COLUMNS))
        buf = io.BytesIO()
        write_stats(StatsTable.from_result(result), buf)
        files["stats.npz"] = buf.getvalue()
        from .calibration_report import reliability_files

        files.update(reliability_files(result))
    if summary.get("uncertainty"):  # --uncertainty: images ranked for review (DESIGN §11.3)
        files["qc.csv"] = qc_csv(summary)
    files["summary.json"] = summary_json(summary)
    return files


def qc_csv(summary: Mapping) -> str:
    """``qc.csv``: images by decreasing mean uncertainty (first score), true error beside."""
    from ..core.uncertainty import qc_rows

    names = tuple(summary["settings"].get("uncertainty") or ())
    thr = summary["uncertainty"]["qc_threshold"]
    columns = ("rank", "image", *(f"uncertainty_{s}" for s in names), "miou", "error",
               "accuracy", "below_threshold")  # fmt: skip
    return rows_csv(qc_rows(summary["images"], names, thr), columns)


def write_reports(
    summary: Mapping, out: Path, *, result=None, folders=None, also=None
) -> list[Path]:
    """Write the report files (``report_files``) into ``out``.

    Published as one unit by ``outputs.publish_report`` (a lock on ``out``, a staging
    folder, a manifest of klseg's files): ``folders`` (``{"heatmaps": fill}``) and ``also``
    (``{junit_path: text}``) are written as part of the same unit.
    """
    from ..io.outputs import publish_report

    return publish_report(Path(out), report_files(summary, result), folders=folders, also=also)


# --- terminal tables ----------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    """ "1 image", "8 images"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary_unit(summary: Mapping) -> str:
    """The unit of the information metrics of a summary: nats, bits or "log base b"."""
    from ..core.metrics import unit_label

    if summary.get("unit"):
        return str(summary["unit"])
    return unit_label(float(summary.get("settings", {}).get("log_base", math.e)))


def summary_table(summary: Mapping):
    """Dataset metrics, pooled and image-mean side by side."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    unit = summary_unit(summary)
    caption = f"kl, ce, js, entropy in {unit}; brier: multi-class sum (0..2)"
    left_out = (summary.get("class_means") or {}).get("left_out") or {}
    if left_out:
        caption += "; class means leave out " + ", ".join(map(str, left_out))
    table = Table(
        title=f"{_count(summary['n_images'], 'image')}, {summary['n_valid']:,} valid pixels",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("metric", no_wrap=True)
    table.add_column("pooled", justify="right", no_wrap=True)
    table.add_column("image mean", justify="right", no_wrap=True)
    for name, pooled, image_mean in dataset_rows(summary["dataset"]):
        table.add_row(name, fmt_ci(summary, pooled), fmt_ci(summary, image_mean))
    # the note below the table, not a caption: a caption wraps at the table's narrow width
    return Group(table, Text(f"  {caption}", style="dim"))


def dataset_rows(dataset: Mapping):
    """(name, pooled key, image-mean key or None) for each metric of a ``dataset`` (the
    calibration views only where they were computed)."""
    from ..core.stats import POOLED_ONLY_METRICS

    for name in IMAGE_COLUMNS[4:]:
        yield name, f"{name}_pooled", f"{name}_image_mean"
    for name in POOLED_ONLY_METRICS:
        if f"{name}_pooled" in dataset:
            yield name, f"{name}_pooled", None
    for name in CALIBRATION_METRICS:  # calibration views: shown when computed
        value = dataset.get(f"{name}_pooled")
        if isinstance(value, float) and math.isfinite(value):
            yield name, f"{name}_pooled", None
    for name in EXTRA_COLUMNS[1:]:  # --boundary: image means only
        if f"{name}_image_mean" in dataset:
            yield name, None, f"{name}_image_mean"
    from ..core.raters import RATER_METRICS

    for name in RATER_METRICS:  # --rater: pooled and image mean
        if f"{name}_pooled" in dataset:
            yield name, f"{name}_pooled", f"{name}_image_mean"
    from ..core.uncertainty import PIXEL_NAMES, SCORES  # --uncertainty: where computed

    for score in SCORES:
        for q in PIXEL_NAMES:
            if f"{q}_{score}_pooled" in dataset:
                yield f"{q}_{score}", f"{q}_{score}_pooled", f"{q}_{score}_image_mean"
        for k in ("spearman", "qc_auroc"):
            if f"{k}_{score}" in dataset:
                yield f"{k}_{score}", f"{k}_{score}", None


def fmt_ci(summary: Mapping, name: str | None, digits: int = 4) -> str:
    """A data-set value, with its bootstrap interval when there is one: 0.712 [0.695, 0.731]."""
    text = fmt(summary["dataset"].get(name) if name else None, digits)
    ci = summary.get("dataset_ci", {}).get(name)
    if ci is not None and text != UNDEFINED:
        text += f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"
    return text


def class_table(summary: Mapping):
    """Per-class results over the whole data set."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="per class", box=box.SIMPLE_HEAD)
    headers = ("id", "class", "pixels", "iou", "dice", "prec", "recall", "kl", "ce")
    for col in headers:
        table.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    for row in summary["classes"]:
        table.add_row(
            str(row["class_id"]),
            escape(printable(row["class_name"])),
            f"{row['n_target']:,}",
            *(fmt(row[k], 3) for k in ("iou", "dice", "precision", "recall", "kl", "ce")),
        )
    return table


# --- requirements (CI gates) ---------------------------------------------------------------


def fmt_interval(row: Mapping) -> str:
    """A requirement's value; with its interval (delta()) in 3 digits: -0.026 [-0.055, 0.0044]."""
    if not row.get("interval"):
        return fmt_g(row["value"])
    lo, hi = row["interval"]
    if lo is None or not math.isfinite(lo):
        return f"{fmt_g(row['value'])} [{UNDEFINED}]"
    return f"{row['value']:.3g} [{lo:.3g}, {hi:.3g}]"


def requirements_table(rows: list[Mapping]):
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="requirements", box=box.SIMPLE_HEAD)
    for col, justify in (("requirement", "left"), ("value", "right"), ("threshold", "right"),
                         ("result", "left")):  # fmt: skip
        table.add_column(col, justify=justify, no_wrap=col != "requirement")
    for row in rows:
        verdict = "[green]PASS[/]" if row["passed"] else "[red]FAIL[/]"
        if row["reason"] in ("undefined", "baseline undefined"):
            verdict += f" ({row['reason']})"
        expr = escape(printable(row["expr"]))
        table.add_row(expr, fmt_interval(row), fmt_g(row["threshold"]), verdict)
    return table


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x07``), for terminals."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def xml_safe(text: str) -> str:
    """``text`` without the characters XML 1.0 forbids (most C0 controls, lone surrogates):
    each is written as a visible escape such as ``\\x01``, so the XML stays well-formed."""
    return _XML_BAD.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def junit_xml(rows: list[Mapping], *, suite: str = "klseg") -> str:
    """JUnit XML: one testcase per requirement, a <failure> for each one that fails.

    Requirement texts hold class names from files: characters XML 1.0 forbids are escaped.
    """
    import xml.etree.ElementTree as ET

    rows = [{k: xml_safe(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]

    failures = sum(not r["passed"] for r in rows)
    root = ET.Element("testsuites", name=suite, tests=str(len(rows)), failures=str(failures))
    ts = ET.SubElement(root, "testsuite", name=f"{suite} requirements", tests=str(len(rows)),
                       failures=str(failures), errors="0", skipped="0")  # fmt: skip
    for row in rows:
        case = ET.SubElement(ts, "testcase", classname=f"{suite}.requirements", name=row["expr"])
        value = fmt_g(row["value"])
        if not row["passed"]:
            message = (f"{row['name']} is undefined" if row["reason"] == "undefined"
                       else row["reason"])  # fmt: skip
            fail = ET.SubElement(case, "failure", message=message, type="RequirementFailed")
            fail.text = f"{row['expr']}: value {value}, threshold {fmt_g(row['threshold'])}"
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"{row['name']} = {value}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def markdown_report(summary: Mapping | None, rows: list[Mapping]) -> str:
    """A Markdown summary (key data-set metrics) and the requirements table."""
    lines = []
    failed = sum(not r["passed"] for r in rows)
    verdict = (
        "all requirements hold" if not failed else f"{failed} of {len(rows)} requirements FAIL"
    )
    lines.append(f"## klseg: {verdict}\n")
    if summary is not None:
        lines.append(
            f"{_count(summary['n_images'], 'image')}, {summary['n_valid']:,} valid pixels.\n"
        )
        lines.append("| metric | pooled | image mean |")
        lines.append("|---|---:|---:|")
        for name, pooled, image_mean in dataset_rows(summary["dataset"]):
            lines.append(f"| {name} | {fmt_ci(summary, pooled)} | {fmt_ci(summary, image_mean)} |")
        lines.append(f"\nkl, ce, js, entropy in {summary_unit(summary)}.")
        if "bootstrap" in summary:
            b = summary["bootstrap"]
            lines.append(f"\n[low, high]: {b['level']:.0%} bootstrap intervals over images "
                         f"({b['resamples']} resamples, seed {b['seed']}).")  # fmt: skip
        lines.append("")
    if rows:
        lines.append("| requirement | value | threshold | result |")
        lines.append("|---|---:|---:|---|")
        for r in rows:
            result = (
                "✅ PASS"
                if r["passed"]
                else "❌ FAIL"
                + (
                    f" ({r['reason']})"
                    if r["reason"] in ("undefined", "baseline undefined")
                    else ""
                )
            )
            expr = r["expr"].replace("|", "\\|")
            value = fmt_interval(r)
            lines.append(f"| `{expr}` | {value} | {fmt_g(r['threshold'])} "
                         f"| {result} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def github_annotations(rows: list[Mapping]) -> list[str]:
    """One ``::error::`` workflow command per failed requirement (GitHub Actions)."""

    def esc(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    out = []
    for r in rows:
        if not r["passed"]:
            why = f"{r['name']} is undefined" if r["reason"] == "undefined" else r["reason"]
            out.append(f"::error title=klseg requirement failed::{esc(r['expr'] + ': ' + why)}")
    return out
