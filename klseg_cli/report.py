"""Presentation: CSV and JSON reports (DESIGN §5) and rich terminal tables."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from .atomic import atomic_path
from .errors import UsageError
from .stats import CALIBRATION_METRICS, CLASS_COLUMNS, IMAGE_COLUMNS

REPORT_FILES = ("per_image.csv", "per_class.csv", "summary.json")


def jsonable(value):
    """A copy of ``value`` that ``json`` can write: NaN and ±Inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # NumPy scalars
        return jsonable(value.item())
    return value


def summary_json(summary: Mapping) -> str:
    return json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def rows_csv(rows: Iterable[Mapping], columns: tuple[str, ...]) -> str:
    """CSV text with exactly ``columns``; undefined numbers are empty cells."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return buf.getvalue()


def write_atomic(files: Mapping[Path, str]) -> None:
    """Write every file to a temporary sibling first, then rename them all into place.

    A reader never sees half a file, and if writing any of them fails, none is replaced.
    """
    with contextlib.ExitStack() as stack:
        for path, text in files.items():
            tmp = stack.enter_context(atomic_path(path))
            tmp.write_text(text, encoding="utf-8", newline="")
        # leaving the stack renames them all, or on an error removes every temporary file


def check_out_dir(out: Path) -> Path:
    """Refuse an ``--out`` that is an existing file (checked before any work is done)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder")
    return out


def refuse_overwriting_inputs(outputs: Iterable[Path | None], inputs: Iterable[Path | None]):
    """A UsageError if an output path is one of the input files."""
    resolved = {Path(p).resolve() for p in inputs if p is not None}
    for path in outputs:
        if path is not None and Path(path).resolve() in resolved:
            raise UsageError(f"{path} is an input file; writing there would destroy it")


def make_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create folder ({err.strerror or err})") from None
    return out


def write_reports(summary: Mapping, out: Path) -> list[Path]:
    """Write ``per_image.csv``, ``per_class.csv`` and ``summary.json`` into ``out``."""
    out = make_out_dir(Path(out))
    files = {
        out / "per_image.csv": rows_csv(summary["images"], IMAGE_COLUMNS),
        out / "per_class.csv": rows_csv(summary["classes"], CLASS_COLUMNS),
        out / "summary.json": summary_json(summary),
    }
    write_atomic(files)
    return list(files)


# --- terminal tables ----------------------------------------------------------------------

UNDEFINED = "—"


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return UNDEFINED
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_g(value) -> str:
    """Up to six significant digits: how a threshold was written, not padded."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return UNDEFINED
    return f"{value:.6g}"


def summary_table(summary: Mapping):
    """Dataset metrics, pooled and image-mean side by side."""
    from rich import box
    from rich.table import Table

    settings = summary["settings"]
    unit = "bits" if settings["log_base"] == 2 else "nats"
    table = Table(
        title=f"{summary['n_images']} images, {summary['n_valid']:,} valid pixels",
        caption=f"kl, ce, js, entropy in {unit}; brier: multi-class sum (0..2)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("metric", no_wrap=True)
    table.add_column("pooled", justify="right", no_wrap=True)
    table.add_column("image mean", justify="right", no_wrap=True)
    dataset = summary["dataset"]
    for name in IMAGE_COLUMNS[4:]:
        table.add_row(
            name, fmt(dataset.get(f"{name}_pooled")), fmt(dataset.get(f"{name}_image_mean"))
        )
    for name in CALIBRATION_METRICS:  # calibration views: shown when computed
        value = dataset.get(f"{name}_pooled")
        if value is not None and math.isfinite(value):
            table.add_row(name, fmt(value), "")
    return table


def class_table(summary: Mapping):
    """Per-class results over the whole data set."""
    from rich import box
    from rich.table import Table

    table = Table(title="per class", box=box.SIMPLE_HEAD)
    headers = ("id", "class", "pixels", "iou", "dice", "prec", "recall", "kl", "ce")
    for col in headers:
        table.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    for row in summary["classes"]:
        table.add_row(
            str(row["class_id"]),
            row["class_name"],
            f"{row['n_target']:,}",
            *(fmt(row[k], 3) for k in ("iou", "dice", "precision", "recall", "kl", "ce")),
        )
    return table


# --- requirements (CI gates) ---------------------------------------------------------------


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
        table.add_row(escape(row["expr"]), fmt_g(row["value"]), fmt_g(row["threshold"]), verdict)
    return table


def junit_xml(rows: list[Mapping], *, suite: str = "klseg") -> str:
    """JUnit XML: one testcase per requirement, a <failure> for each one that fails."""
    import xml.etree.ElementTree as ET

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
        lines.append(f"{summary['n_images']} images, {summary['n_valid']:,} valid pixels.\n")
        lines.append("| metric | pooled | image mean |")
        lines.append("|---|---:|---:|")
        for name in IMAGE_COLUMNS[4:]:
            d = summary["dataset"]
            lines.append(f"| {name} | {fmt(d.get(f'{name}_pooled'))} "
                         f"| {fmt(d.get(f'{name}_image_mean'))} |")  # fmt: skip
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
            lines.append(f"| `{expr}` | {fmt_g(r['value'])} | {fmt_g(r['threshold'])} "
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
