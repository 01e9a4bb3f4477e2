"""How a number, a CSV row and a JSON document are written, shared by every report
(evaluate, compare, calibrate, reliability): NaN as null, no spreadsheet formulas, atomic
files, and output folders that never overwrite an input."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import UsageError
from ..io.atomic import atomic_path

INFINITIES = {math.inf: "inf", -math.inf: "-inf"}
"""How summary.json writes ±inf (a boundary distance to a class missing from one mask):
JSON has no infinity, and null already means "undefined"; ``summaryfile.read_infinities``
reads the strings back as floats."""


def jsonable(value):
    """A copy of ``value`` that ``json`` can write: NaN becomes null, ±inf "inf"/"-inf"."""
    if isinstance(value, float):
        if math.isinf(value):
            return INFINITIES[value]
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


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A text cell starting with one of these is a formula to a spreadsheet (CSV injection)."""


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):  # a boundary distance to a class missing from one mask
            return "inf" if value > 0 else "-inf"
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value  # text from file names or class names, never a formula
    return str(value)


def _csv_field(text: str) -> str:
    """RFC 4180 quoting; unlike the csv module with a \\n line end, a lone \\r is quoted
    too, so a stem holding one cannot break its row."""
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def rows_csv(rows: Iterable[Mapping], columns: tuple[str, ...]) -> str:
    """CSV text with exactly ``columns``; undefined numbers are empty cells.

    Text cells (image stems, class names) that start with ``= + - @`` (or a tab or CR) get
    a leading ``'`` so a spreadsheet shows them as text instead of running them.
    """
    lines = [",".join(_csv_field(c) for c in columns)]
    for row in rows:
        lines.append(",".join(_csv_field(_cell(row[c])) for c in columns))
    return "\n".join(lines) + "\n"


def write_atomic(files: Mapping[Path, str]) -> None:
    """Write every file to a temporary sibling first, then rename them all into place.

    A reader never sees half a file, and if writing any of them fails, none is replaced.
    """
    with contextlib.ExitStack() as stack:
        for path, text in files.items():
            tmp = stack.enter_context(atomic_path(path))
            tmp.write_text(text, encoding="utf-8", newline="")


def check_out_dir(out: Path) -> Path:
    """Refuse an ``--out`` that is an existing file (checked before any work is done)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder")
    return out


def refuse_overwriting_inputs(outputs: Iterable[Path | None], inputs: Iterable[Path | None]):
    """A UsageError if an output path is one of the input files."""
    resolved = {  # a URL (remote.py) is never a local output
        Path(p).resolve() for p in inputs if p is not None and not getattr(p, "is_remote", False)
    }
    for path in outputs:
        if path is not None and Path(path).resolve() in resolved:
            raise UsageError(f"{path} is an input file; writing there would destroy it")


def make_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create folder ({err.strerror or err})") from None
    return out


UNDEFINED = "—"


def fmt(value, digits: int = 4) -> str:
    if isinstance(value, float) and math.isinf(value):  # a boundary distance, one mask empty
        return "inf" if value > 0 else "-inf"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return UNDEFINED
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_g(value) -> str:
    """Up to six significant digits: how a threshold was written, not padded."""
    if isinstance(value, float) and math.isinf(value):  # a boundary distance, one mask empty
        return "inf" if value > 0 else "-inf"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return UNDEFINED
    return f"{value:.6g}"
