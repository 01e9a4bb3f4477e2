"""``--require`` expressions: parse (a small scanner, never ``eval``) and check.

Grammar (whitespace anywhere between tokens)::

    requirement := name op value
    name        := IDENT | IDENT "[" class "]"       # miou_pooled, iou[road], dice[3]
    op          := "<" | "<=" | ">" | ">="
    value       := NUMBER | "baseline" [ ("+" | "-") NUMBER ]

A gate must never pass silently: an unknown name or class is a usage error that lists the
valid names, an undefined (NaN) value fails with the reason "undefined", and a baseline
computed with other numeric settings is an error unless explicitly allowed.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import InputError, UsageError

OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
CLASS_METRICS = ("iou", "dice", "precision", "recall", "kl", "ce")
SETTINGS_THAT_CHANGE_NUMBERS = (
    "num_classes", "classes", "eps", "smoothing", "ignore_index", "input", "log_base",
    "soft_gt", "ece_bins", "renormalize", "temperature", "boundary_band",
)  # fmt: skip
SETTING_DEFAULTS = {"temperature": 1.0, "boundary_band": 3}
"""Values of settings that summaries written before them lack."""

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<op><=|>=|<|>)
      | (?P<sign>[+-])
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<bracket>\[[^\]]*\])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Requirement:
    """One parsed ``--require`` expression."""

    text: str
    metric: str  # a dataset key, or a per-class metric such as "iou"
    klass: str | None  # class name or id as written, for per-class metrics
    op: str
    number: float | None  # the threshold, or the offset from the baseline
    baseline: bool

    @property
    def name(self) -> str:
        return f"{self.metric}[{self.klass}]" if self.klass is not None else self.metric


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise UsageError(
                f"--require {text!r}: cannot read {text[pos:].strip()!r}; a requirement is "
                "NAME OP VALUE with the comparison OP one of <, <=, >, >="
            )
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


def parse_requirement(text: str) -> Requirement:
    """Parse ``NAME OP VALUE``; a malformed expression is a UsageError saying what is wrong."""
    toks = _tokens(text)
    if not toks:
        raise UsageError("--require needs an expression such as 'miou_pooled >= 0.7'")

    def fail(why: str) -> UsageError:
        return UsageError(f"--require {text!r}: {why}; expected e.g. 'miou_pooled >= 0.7'")

    i = 0
    if toks[i][0] != "ident":
        raise fail("it must start with a metric name")
    metric = toks[i][1]
    i += 1
    klass = None
    if i < len(toks) and toks[i][0] == "bracket":
        klass = toks[i][1][1:-1].strip()
        if not klass:
            raise fail("empty class in brackets")
        i += 1
    if i >= len(toks) or toks[i][0] != "op":
        raise fail("a comparison (<, <=, >, >=) must follow the name")
    op = toks[i][1]
    i += 1
    if i >= len(toks):
        raise fail(f"a number or 'baseline' must follow {op!r}")
    kind, value, _ = toks[i]
    i += 1
    if kind == "number":
        req = Requirement(text, metric, klass, op, float(value), baseline=False)
    elif kind == "ident" and value == "baseline":
        offset = 0.0
        if i < len(toks):
            if toks[i][0] == "sign" and i + 1 < len(toks) and toks[i + 1][0] == "number":
                number = toks[i + 1][1]
                if number[0] in "+-":
                    raise fail("write 'baseline - 0.01', one sign")
                offset = float(number) if toks[i][1] == "+" else -float(number)
                i += 2
            elif toks[i][0] == "number" and toks[i][1][0] in "+-":  # "baseline -0.01"
                offset = float(toks[i][1])
                i += 1
            else:
                raise fail("only '+ NUMBER' or '- NUMBER' may follow 'baseline'")
        req = Requirement(text, metric, klass, op, offset, baseline=True)
    else:
        raise fail(f"{value!r} is neither a number nor 'baseline'")
    if i != len(toks):
        raise fail(f"unexpected {toks[i][1]!r} at the end")
    if not math.isfinite(req.number):
        raise fail("the number must be finite")
    return req


def dataset_keys() -> list[str]:
    """The names in ``summary.json``'s ``dataset`` object (known before any computing)."""
    from .stats import CALIBRATION_METRICS, IMAGE_MEAN_METRICS

    keys = [f"{m}_{kind}" for m in IMAGE_MEAN_METRICS for kind in ("pooled", "image_mean")]
    return keys + [f"{m}_pooled" for m in CALIBRATION_METRICS]


def check_names(texts: Sequence[str]) -> list[Requirement]:
    """Parse every expression and check the names that do not depend on the data.

    Called before an evaluation, so a typo fails in a second, not after an hour of work.
    Class names are checked once the classes are known.
    """
    template = {"dataset": dict.fromkeys(dataset_keys(), math.nan), "classes": []}
    reqs = [parse_requirement(t) for t in texts]
    for req in reqs:
        if req.klass is None or req.metric not in CLASS_METRICS:
            lookup(template, req)
    return reqs


def valid_names(summary: Mapping) -> list[str]:
    return sorted(summary["dataset"]) + [f"{m}[CLASS]" for m in CLASS_METRICS]


def lookup(summary: Mapping, req: Requirement, *, what: str = "summary") -> float:
    """The value ``req`` names in a summary (NaN when undefined); unknown names raise."""
    if req.klass is None:
        if req.metric not in summary["dataset"]:
            hint = (
                f"; per-class values need a class: {req.metric}[NAME]"
                if req.metric in CLASS_METRICS
                else ""
            )
            raise UsageError(
                f"--require {req.text!r}: unknown name {req.metric!r}{hint}. Valid names: "
                + ", ".join(valid_names(summary))
            )
        value = summary["dataset"][req.metric]
    else:
        if req.metric not in CLASS_METRICS:
            raise UsageError(
                f"--require {req.text!r}: {req.metric!r} has no per-class value; use one of "
                + ", ".join(f"{m}[...]" for m in CLASS_METRICS)
            )
        rows = summary["classes"]
        row = next((r for r in rows if r["class_name"] == req.klass), None)
        if row is None and req.klass.isdigit():
            row = next((r for r in rows if r["class_id"] == int(req.klass)), None)
        if row is None:
            names = ", ".join(f"{r['class_name']} ({r['class_id']})" for r in rows)
            raise UsageError(
                f"--require {req.text!r}: no class {req.klass!r} in the {what}; classes: {names}"
            )
        value = row[req.metric]
    return math.nan if value is None else float(value)


def settings_differences(current: Mapping, baseline: Mapping) -> list[str]:
    """Human-readable differences in the settings that change numbers."""
    diffs = []
    for key in SETTINGS_THAT_CHANGE_NUMBERS:
        a = current.get(key, SETTING_DEFAULTS.get(key))
        b = baseline.get(key, SETTING_DEFAULTS.get(key))
        if a != b:
            diffs.append(f"{key}: {b!r} in the baseline, {a!r} now")
    return diffs


def check_baseline_settings(summary: Mapping, baseline: Mapping, *, allow_change: bool) -> None:
    diffs = settings_differences(summary["settings"], baseline.get("settings", {}))
    if diffs and not allow_change:
        raise UsageError(
            "the baseline was computed with other settings (" + "; ".join(diffs) + "); "
            "use the same options, or pass --allow-settings-change"
        )


def check_requirements(
    summary: Mapping,
    texts: Sequence[str],
    *,
    baseline: Mapping | None = None,
    allow_settings_change: bool = False,
) -> list[dict]:
    """Check every expression against ``summary``; returns the ``requirements`` rows.

    Parsing and name errors are raised before anything is checked, so a typo never turns
    into a silent pass.
    """
    reqs = [parse_requirement(t) for t in texts]
    if baseline is not None:
        check_baseline_settings(summary, baseline, allow_change=allow_settings_change)
    rows = []
    for req in reqs:
        value = lookup(summary, req)
        if req.baseline:
            if baseline is None:
                raise UsageError(
                    f"--require {req.text!r} compares with 'baseline': pass --baseline"
                )
            base = lookup(baseline, req, what="baseline")
            threshold = base + req.number
        else:
            base = None
            threshold = req.number
        if math.isnan(value):
            passed, reason = False, "undefined"
        elif math.isnan(threshold):
            passed, reason = False, "baseline undefined"
        else:
            passed = bool(OPERATORS[req.op](value, threshold))
            reason = "" if passed else f"{req.name} = {value:.6g}, not {req.op} {threshold:.6g}"
        rows.append({
            "expr": req.text,
            "name": req.name,
            "op": req.op,
            "value": value,
            "threshold": threshold,
            "baseline": base,
            "passed": passed,
            "reason": reason,
        })  # fmt: skip
    return rows


def load_summary(path) -> dict:
    """Read a summary.json written by klseg (for ``gate`` and ``--baseline``)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no such file", path=path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read ({err})", path=path) from None
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err.msg} at line {err.lineno})", path=path) from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("dataset"), dict)
        or not isinstance(data.get("classes"), list)
    ):
        raise InputError("not a klseg summary.json (no 'dataset' and 'classes')", path=path)
    return data
