"""What a ``summary.json`` read back (``klseg gate``, ``--baseline``) must look like.

A summary from another tool, an older klseg or a hand edit is data, not code: every field
the gate reads is checked for its type before use, so a list where an object belongs, a
class row without its name, or ``"0.7"`` as a string for a number is one error line naming
the file and the field (exit 2), never a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError

CLASS_NUMBERS = ("iou", "dice", "precision", "recall", "kl", "ce")
INFINITIES = {"inf": math.inf, "-inf": -math.inf}
"""summary.json writes ±inf as these strings (JSON has none; null means undefined)."""
TEXT_FIELDS = frozenset({"class_name", "image"})
"""Fields of class and image rows that hold text: a class named "inf" stays a name."""


def _number(value):
    return INFINITIES.get(value, value) if isinstance(value, str) else value


def _numbers(row):
    """A row (object) or interval (list) with "inf"/"-inf" turned into floats."""
    if isinstance(row, dict):
        return {k: v if k in TEXT_FIELDS else _numbers(v) for k, v in row.items()}
    if isinstance(row, list):
        return [_numbers(v) for v in row]
    return _number(row)


def read_infinities(data: dict) -> dict:
    """``data`` (a loaded summary or compare.json) with the number fields' "inf"/"-inf"
    read back as ±inf: ``dataset``, the intervals, the ``delta`` values, and every field
    of the class and image rows but their names."""
    for key in ("dataset", "dataset_ci", "delta", "delta_ci"):
        if isinstance(data.get(key), dict):
            data[key] = _numbers(data[key])
    for key in ("classes", "images"):
        if isinstance(data.get(key), list):
            data[key] = [_numbers(r) if isinstance(r, dict) else r for r in data[key]]
    return data


def _is_number(value) -> bool:
    """null, a float, or an int a float can hold (a 400-digit int overflows ``float``)."""
    if value is None or isinstance(value, float):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1023


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_summary(data: Mapping, path: Path | str) -> None:
    """Raise InputError for the first field of a loaded summary that the gate cannot use.

    ``dataset``/``classes`` are known to be an object and a list. Adds an empty ``settings``
    object when there is none (then no baseline settings can be compared).
    """

    def bad(where: str, why: str) -> InputError:
        return InputError(f"not a usable klseg summary: {where} {why}", path=path)

    settings = data.setdefault("settings", {})
    if not isinstance(settings, dict):
        raise bad("'settings'", f"is a {type(settings).__name__}, not an object")
    for key in ("n_images", "n_valid"):
        if key in data and not _is_count(data[key]):
            raise bad(f"'{key}'", f"is {_show(data[key])}, not a count")
    for key, value in data["dataset"].items():
        if not _is_number(value):
            raise bad(f"dataset '{key}'", f'is {_show(value)}, not a number, null or "inf"')
    for i, row in enumerate(data["classes"]):
        if not isinstance(row, dict):
            raise bad(f"classes[{i}]", f"is a {type(row).__name__}, not an object")
        if not isinstance(row.get("class_name"), str):
            raise bad(f"classes[{i}]", "has no 'class_name' text")
        if not _is_count(row.get("class_id")):
            raise bad(f"classes[{i}]", "has no 'class_id' count")
        for key in CLASS_NUMBERS:
            if key not in row:
                raise bad(f"classes[{i}]", f"has no '{key}'")
            if not _is_number(row[key]):
                raise bad(
                    f"classes[{i}] '{key}'", f'is {_show(row[key])}, not a number, null or "inf"'
                )
    for key in ("n_target",):  # shown in the class table
        for i, row in enumerate(data["classes"]):
            if key in row and not _is_count(row[key]):
                raise bad(f"classes[{i}] '{key}'", f"is {_show(row[key])}, not a count")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
