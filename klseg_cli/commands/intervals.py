"""Bootstrap intervals and paired deltas added to a summary (``evaluate``, ``gate``).

The maths is in ``bootstrap.py``, the file format in ``statsfile.py``; this module decides
what a run needs (from its ``--require`` expressions and options), finds a baseline's
stats.npz, and writes the results into the summary:

    "bootstrap":  {"resamples", "seed", "level", "paired_by": "image stem"}
    "dataset_ci": {metric: [low, high]}                 every data-set metric
    "delta":      {metric: this run − baseline}         with a baseline's stats.npz
    "delta_ci":   {metric: [low, high]}, "delta_images": images paired
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.bootstrap import DEFAULT_RESAMPLES, LEVEL, align, dataset_intervals, paired_delta
from ..errors import InputError, UsageError
from ..io.statsfile import StatsTable, check_matches_summary, load_stats, stats_beside
from .requirements import parse_requirement


def requirement_needs(texts: Sequence[str]) -> tuple[bool, bool]:
    """Whether the expressions use intervals (low/high) and paired deltas (delta)."""
    bounds = {parse_requirement(t).bound for t in texts}
    return bool(bounds & {"low", "high"}), "delta" in bounds


def resamples_for(bootstrap: int | None, texts: Sequence[str]) -> int:
    """Resamples to draw: ``--bootstrap N``, else the default when a requirement needs them."""
    if bootstrap is not None and bootstrap < 0:
        raise UsageError(f"--bootstrap must be positive, got {bootstrap}")
    if bootstrap:
        return bootstrap
    needs_ci, needs_delta = requirement_needs(texts)
    return DEFAULT_RESAMPLES if (needs_ci or needs_delta) else 0


def stats_of(
    summary_path: str | Path, summary: Mapping, *, required: str | None
) -> StatsTable | None:
    """The stats.npz beside ``summary_path`` (checked to belong to it), or None when absent
    and not ``required`` (else an error saying what needed it)."""
    path = stats_beside(summary_path)
    if not path.exists():
        if required:
            raise InputError(
                f"no stats.npz beside it; {required} needs the per-image sums that "
                "klseg evaluate --out writes there",
                path=summary_path,
            )
        return None
    table = load_stats(path)
    check_matches_summary(table, summary, path)
    return table


def add_intervals(
    summary: dict,
    table: StatsTable,
    *,
    n_resamples: int,
    seed: int,
    baseline: StatsTable | None = None,
    common_only: bool = False,
    delta_required: bool = True,
) -> str | None:
    """Add ``dataset_ci`` (and with a baseline ``delta``, ``delta_ci``) to ``summary``.

    Returns a warning when the baseline's images differ and no ``delta()`` requirement
    needs the deltas (they are then left out instead of failing the run).
    """
    summary["bootstrap"] = {
        "resamples": n_resamples, "seed": seed, "level": LEVEL, "paired_by": "image stem",
    }  # fmt: skip
    summary["dataset_ci"] = dataset_intervals(table, summary, n_resamples=n_resamples, seed=seed)
    if baseline is not None:
        try:
            base, current = align(baseline, table, common_only=common_only)
        except UsageError as err:
            if delta_required:
                raise
            return f"no delta against the baseline: {err}"
        delta, ci = paired_delta(base, current, n_resamples=n_resamples, seed=seed)
        summary["delta"], summary["delta_ci"] = delta, ci
        summary["delta_images"] = len(current)
    return None
