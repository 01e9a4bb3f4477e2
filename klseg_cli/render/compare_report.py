"""Presentation of ``klseg compare``: compare.csv, compare.json and the terminal tables."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..core.agreement import IMAGE_METRICS, PAIR_METRICS
from ..core.stats import IMAGE_MEAN_METRICS
from .formats import fmt, make_out_dir, rows_csv, summary_json, write_atomic

COMPARE_FILES = ("compare.csv", "compare.json")
BASE_COLUMNS = ("image", "height", "width", "n_valid", *IMAGE_METRICS)


def image_columns(summary: Mapping) -> tuple[str, ...]:
    """compare.csv's columns: the agreement metrics, with targets also a_*, b_*, delta_*."""
    if summary.get("target") is None:
        return BASE_COLUMNS
    return (
        *BASE_COLUMNS,
        *(f"a_{m}" for m in IMAGE_MEAN_METRICS),
        *(f"b_{m}" for m in IMAGE_MEAN_METRICS),
        *(f"delta_{m}" for m in IMAGE_MEAN_METRICS),
    )


def write_compare_reports(summary: Mapping, out: Path) -> list[Path]:
    """Write compare.csv (one row per image) and compare.json into ``out``, atomically."""
    out = make_out_dir(Path(out))
    files = {
        out / "compare.csv": rows_csv(summary["images"], image_columns(summary)),
        out / "compare.json": summary_json(summary),
    }
    write_atomic(files)
    return list(files)


def _with_ci(value, ci, digits: int = 4) -> str:
    text = fmt(value, digits)
    if ci is not None and text != "—" and ci[0] is not None:
        text += f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"
    return text


def agreement_table(summary: Mapping):
    """KL(A‖B), KL(B‖A), JS, argmax agreement: pooled and image mean."""
    from rich import box
    from rich.table import Table

    unit = "bits" if summary["settings"]["log_base"] == 2 else "nats"
    table = Table(
        title=f"A vs B: {summary['n_images']} images, {summary['n_valid']:,} pixels",
        caption=f"kl_ab = KL(A‖B), kl_ba = KL(B‖A), js in {unit}; agreement: B's argmax = A's",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("metric", no_wrap=True)
    table.add_column("pooled", justify="right", no_wrap=True)
    table.add_column("image mean", justify="right", no_wrap=True)
    ci = summary.get("dataset_ci", {})
    for m in IMAGE_METRICS:
        cells = [
            _with_ci(summary["dataset"][f"{m}_{k}"], ci.get(f"{m}_{k}"))
            for k in ("pooled", "image_mean")
        ]
        table.add_row(m, *cells)
    return table


def agreement_class_table(summary: Mapping):
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="per class (by A's argmax)", box=box.SIMPLE_HEAD)
    for col in ("id", "class", "pixels A", "pixels B", "agree IoU", *PAIR_METRICS):
        table.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    for row in summary["classes"]:
        table.add_row(
            str(row["class_id"]), escape(row["class_name"]), f"{row['n_a']:,}", f"{row['n_b']:,}",
            *(fmt(row[k], 3) for k in ("agreement_iou", *PAIR_METRICS)),
        )  # fmt: skip
    return table


def models_table(summary: Mapping):
    """Both models against the targets, side by side, with B − A and its interval."""
    from rich import box
    from rich.table import Table

    table = Table(title="A and B against the targets", box=box.SIMPLE_HEAD,
                  caption="Δ = B − A, paired over images")  # fmt: skip
    for col in ("metric", "A", "B", "Δ"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    a, b = summary["models"]["a"], summary["models"]["b"]
    ci = summary.get("delta_ci", {})
    for name in a:
        table.add_row(name, fmt(a[name]), fmt(b[name]), _with_ci(summary["delta"][name],
                                                                 ci.get(name)))  # fmt: skip
    return table


def worst_table(summary: Mapping):
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    by = "Δkl" if summary["rank_by"] == "kl" else "Δmiou"
    table = Table(title=f"where B is most worse than A (by {by})", box=box.SIMPLE_HEAD)
    for col in ("image", "Δkl", "Δmiou", "miou A", "miou B"):
        table.add_column(col, justify="left" if col == "image" else "right", no_wrap=True)
    for row in summary["worst"]:
        table.add_row(escape(row["image"]), fmt(row["delta_kl"]), fmt(row["delta_miou"]),
                      fmt(row["a_miou"]), fmt(row["b_miou"]))  # fmt: skip
    return table


def print_compare(summary: Mapping, console) -> None:
    console.print(agreement_table(summary))
    console.print(agreement_class_table(summary))
    if "models" in summary:
        console.print(models_table(summary))
        if summary["worst"]:
            console.print(worst_table(summary))
