"""``--require`` expressions: parse (a small scanner, never ``eval``) and check.

Grammar (whitespace anywhere between tokens)::

    requirement := name op value
    name        := IDENT | IDENT "[" class "]"       # miou_pooled, iou[road], dice[3]
                 | BOUND "(" IDENT ")"               # low(miou_pooled), delta(kl_pooled)
    op          := "<" | "<=" | ">" | ">="
    value       := NUMBER | "baseline" [ ("+" | "-") NUMBER ]

A gate must never pass silently: an unknown name or class is a usage error that lists the
valid names, an undefined (NaN) value fails with the reason "undefined", and a baseline
computed with other numeric settings is an error unless explicitly allowed.

Bootstrap bounds (DESIGN §8): ``low(NAME)`` and ``high(NAME)`` are the ends of NAME's 95%
interval (``dataset_ci``); ``delta(NAME)`` is the paired difference this run − baseline
(``delta``, ``delta_ci``), and a requirement on it fails only when its whole interval is on
the wrong side: ``delta(x) >= t`` (or ``>``) fails only when high(delta) < t (``<=`` t);
``delta(x) <= t`` (or ``<``) only when low(delta) > t (``>=`` t). They compare with a number.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..errors import InputError, UsageError

BOUNDS = ("low", "high", "delta")
OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
CLASS_METRICS = ("iou", "dice", "precision", "recall", "kl", "ce")
SETTINGS_THAT_CHANGE_NUMBERS = (
    "num_classes", "classes", "eps", "smoothing", "ignore_index", "input", "log_base",
    "soft_gt", "ece_bins", "renormalize", "label_map", "reduce_zero_label", "exclude_classes",
    "temperature", "boundary_band", "raters",
)  # fmt: skip
SETTING_DEFAULTS = {
    "label_map": None, "reduce_zero_label": False, "exclude_classes": [], "temperature": 1.0,
    "boundary_band": 3, "raters": None,
}  # fmt: skip
"""Values of settings that summaries written before they existed lack."""

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<op><=|>=|<|>)
      | (?P<sign>[+-])
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<bracket>\[[^\]]*\])
      | (?P<paren>\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\))
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
    bound: str | None = None  # "low", "high" or "delta": a bootstrap bound of ``metric``

    @property
    def name(self) -> str:
        if self.bound is not None:
            return f"{self.bound}({self.metric})"
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
    bound = None
    if i < len(toks) and toks[i][0] == "paren":
        if metric not in BOUNDS:
            raise fail(f"{metric!r} is not one of {', '.join(BOUNDS)}")
        bound, metric = metric, toks[i][1][1:-1].strip()
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
    if bound is not None:
        if klass is not None or req.baseline:
            raise fail(f"{bound}() compares a data-set metric with a number")
        req = Requirement(text, metric, None, op, req.number, baseline=False, bound=bound)
    return req


def dataset_keys() -> list[str]:
    """The names in ``summary.json``'s ``dataset`` object (known before any computing)."""
    from ..core.stats import dataset_metric_names

    return dataset_metric_names()


def check_names(texts: Sequence[str], extra: Sequence[str] = ()) -> list[Requirement]:
    """Parse every expression and check the names that do not depend on the data.

    Called before an evaluation, so a typo fails in a second, not after an hour of work.
    Class names are checked once the classes are known. ``extra``: names this run adds
    (``--rater``: raters.dataset_names()).
    """
    names = [*dataset_keys(), *extra]
    template = {"dataset": dict.fromkeys(names, math.nan), "classes": []}
    reqs = [parse_requirement(t) for t in texts]
    for req in reqs:
        if req.klass is None or req.metric not in CLASS_METRICS:
            lookup(template, replace(req, bound=None) if req.bound else req)
    return reqs


def valid_names(summary: Mapping) -> list[str]:
    """The names a requirement may use on ``summary``: per-class ones unless it says it
    takes none (``"per_class": False``: compare's data-set-only names)."""
    per_class = [f"{m}[CLASS]" for m in CLASS_METRICS] if _per_class(summary) else []
    return sorted(summary["dataset"]) + per_class


def _per_class(summary: Mapping) -> bool:
    return summary.get("per_class", True) is not False


def did_you_mean(word: str, candidates) -> str:
    """ "; did you mean X?" for the closest candidate (case-insensitive first), or ""."""
    import difflib

    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered:
        return f"; did you mean {lowered[word.lower()]!r}?"
    prefixed = [c for c in candidates if c.lower().startswith(word.lower() + "_")]
    if prefixed:  # "miou": miou_pooled or miou_image_mean
        return "; did you mean " + " or ".join(repr(c) for c in prefixed[:3]) + "?"
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


def lookup(summary: Mapping, req: Requirement, *, what: str = "summary") -> float:
    """The value ``req`` names in a summary (NaN when undefined); unknown names raise."""
    if req.bound is not None:
        return _bound(summary, req)[0]
    if req.klass is None:
        if req.metric not in summary["dataset"]:
            hint = (
                f"; per-class values need a class: {req.metric}[NAME]"
                if req.metric in CLASS_METRICS and _per_class(summary)
                else ""
            )
            if not hint:
                per_class = CLASS_METRICS if _per_class(summary) else ()
                hint = did_you_mean(req.metric, [*summary["dataset"], *per_class])
            raise UsageError(
                f"--require {req.text!r}: unknown name {req.metric!r}{hint}"
                f"{' ' if hint.endswith('?') else '. '}Valid names: "
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
            hint = did_you_mean(req.klass, [str(r["class_name"]) for r in rows])
            if not hint and rows and all(str(r["class_name"]) == str(r["class_id"]) for r in rows):
                hint = (
                    "; the classes have no names (only ids): pass --classes to evaluate, or "
                    f"use an id such as {req.metric}[0]"
                )
            raise UsageError(
                f"--require {req.text!r}: no class {req.klass!r} in the {what}{hint}; "
                f"classes: {names}"
            )
        value = row[req.metric]
    return math.nan if value is None else float(value)


def _bound(summary: Mapping, req: Requirement) -> tuple[float, list[float]]:
    """(value, [low, high]) of a low()/high()/delta() requirement; absent intervals raise."""
    if req.bound == "delta" and "delta" in summary:
        if req.metric not in summary["delta"]:
            raise UsageError(
                f"--require {req.text!r}: unknown name {req.metric!r}. Valid names: "
                + ", ".join(sorted(summary["delta"]))
            )
    else:
        lookup(summary, replace(req, bound=None))  # an unknown metric name: the usual error
    key, point = ("delta_ci", "delta") if req.bound == "delta" else ("dataset_ci", "dataset")
    if key not in summary:
        need = (
            "--baseline with a stats.npz beside its summary.json"
            if req.bound == "delta"
            else "bootstrap intervals (--bootstrap N, and a stats.npz beside a gated summary)"
        )
        raise UsageError(f"--require {req.text!r} needs {need}")
    low, high = (
        math.nan if v is None else float(v) for v in summary[key].get(req.metric, (None, None))
    )
    if req.bound == "low":
        return low, [low, high]
    if req.bound == "high":
        return high, [low, high]
    value = summary[point].get(req.metric)
    return (math.nan if value is None else float(value)), [low, high]


def settings_differences(current: Mapping, baseline: Mapping) -> list[str]:
    """Human-readable differences in the settings that change numbers."""
    diffs = []
    for key in SETTINGS_THAT_CHANGE_NUMBERS:
        a = current.get(key, SETTING_DEFAULTS.get(key))
        b = baseline.get(key, SETTING_DEFAULTS.get(key))
        if key == "label_map":  # the table counts, not the path it was read from
            a, b = (m.get("map") if isinstance(m, dict) else m for m in (a, b))
        if a != b:
            diffs.append(f"{key}: {b!r} in the baseline, {a!r} now")
    a, b = current.get("boundary"), baseline.get("boundary")  # --boundary: when both have it
    if a is not None and b is not None and a != b:
        diffs.append(f"boundary: {b!r} in the baseline, {a!r} now")
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
        interval = _bound(summary, req)[1] if req.bound == "delta" else None
        if math.isnan(value) or (interval is not None and math.isnan(interval[0])):
            passed, reason = False, "undefined"
        elif math.isnan(threshold):
            passed, reason = False, "baseline undefined"
        elif interval is not None:
            # fails only when the whole interval lies on the wrong side of the threshold
            upward = req.op in (">=", ">")
            decisive = interval[1] if upward else interval[0]
            passed = bool(OPERATORS[req.op](decisive, threshold))
            side = "below" if upward else "above"
            reason = "" if passed else (
                f"{req.name} = {value:.6g}, 95% interval [{interval[0]:.6g}, "
                f"{interval[1]:.6g}] lies wholly {side} {threshold:.6g}"
            )  # fmt: skip
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
            **({"interval": interval} if interval is not None else {}),
        })  # fmt: skip
    return rows


def load_summary(path) -> dict:
    """Read a summary.json written by klseg (for ``gate`` and ``--baseline``)."""
    import json
    from pathlib import Path

    from ..io.safeio import read_small_text
    from ..io.summaryfile import check_summary, read_infinities

    path = Path(path)
    text = read_small_text(path, what="summary.json")  # bounded; FIFOs and devices refused
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err.msg} at line {err.lineno})", path=path) from None
    except (ValueError, RecursionError) as err:  # a 4300-digit int, 100000 nested brackets
        raise InputError(f"not usable JSON ({str(err).split(';')[0]})", path=path) from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("dataset"), dict)
        or not isinstance(data.get("classes"), list)
    ):
        raise InputError("not a klseg summary.json (no 'dataset' and 'classes')", path=path)
    check_summary(read_infinities(data), path)
    return data


def gate_files(summary, rows, *, junit, markdown) -> dict:
    """``{path: text}`` of the ``--junit`` and ``--markdown`` files asked for."""
    from ..render import report

    files = {}
    if junit is not None:
        files[junit] = report.junit_xml(rows)
    if markdown is not None:
        files[markdown] = report.markdown_report(summary, rows)
    return files
