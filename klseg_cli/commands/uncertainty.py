"""What ``klseg evaluate --uncertainty`` computes, as library functions the CLI calls.

The options become ``plan`` keywords here (a ``--require`` that names a failure-detection
metric turns its score on, as it does for the calibration views), and the report's
``qc.csv`` and ``--risk-coverage`` PNG are made from an evaluation's result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..core.uncertainty import (
    DEFAULT_QC_THRESHOLD,
    SCORES,
    check_scores,
    dataset_names,
)
from ..errors import UsageError


def parse_scores(specs: Sequence[str] | None) -> tuple[str, ...]:
    """Scores from ``--uncertainty`` values (each a name or a comma-separated list)."""
    names = [part for spec in specs or () for part in str(spec).split(",") if part.strip()]
    if specs and not names:
        raise UsageError("--uncertainty names no score; choose from maxprob, entropy, margin")
    try:
        return check_scores(names)
    except ValueError as err:
        raise UsageError(f"--uncertainty: {err}") from None


def required_scores(reqs) -> tuple[str, ...]:
    """The scores whose metrics a requirement names (``auroc_entropy_pooled >= 0.8``)."""
    by_name = {name: s for s in SCORES for name in dataset_names((s,))}
    return tuple(dict.fromkeys(by_name[r.metric] for r in reqs
                               if r.klass is None and r.metric in by_name))  # fmt: skip


def plan_keywords(specs: Sequence[str] | None, qc_threshold: float | None, reqs=()) -> dict:
    """``plan`` keywords of evaluate's ``--uncertainty`` and ``--qc-threshold``."""
    names = check_scores([*parse_scores(specs), *required_scores(reqs)])
    if qc_threshold is not None and not names:
        raise UsageError("--qc-threshold needs --uncertainty SCORE (e.g. --uncertainty entropy)")
    if not names:
        return {}
    thr = DEFAULT_QC_THRESHOLD if qc_threshold is None else qc_threshold
    return {"uncertainty": names, "qc_threshold": thr}


def heatmap_keywords(metric: str, score: str | None, threshold: float | None) -> dict:
    """``plan`` keywords of heatmap's ``--uncertainty SCORE`` and ``--threshold``."""
    if metric != "uncertainty-error":
        raise UsageError("--uncertainty and --threshold go with --metric uncertainty-error")
    names = parse_scores([score or "entropy"])
    if len(names) != 1:
        raise UsageError("heatmap --uncertainty takes one score")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise UsageError(f"--threshold {threshold}: a score is a number >= 0; give one")
    return {"uncertainty": names}


def check_risk_coverage(path: Path | None, names: Sequence[str], out: Path | None) -> None:
    """``--risk-coverage FILE.png``: a PNG name, and scores to draw."""
    if path is None:
        return
    if path.suffix.lower() != ".png":
        raise UsageError(f"--risk-coverage {path}: the plot is a PNG; name it .png")
    if not names:
        raise UsageError("--risk-coverage needs --uncertainty SCORE (e.g. --uncertainty entropy)")
    from ..io.outputs import check_output_file

    check_output_file(path, "--risk-coverage", report_dir=out)


def write_risk_coverage(result, path: Path) -> Path:
    from ..render.risk_coverage import write_risk_coverage_png

    return write_risk_coverage_png(result, path)
