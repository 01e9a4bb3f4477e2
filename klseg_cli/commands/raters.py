"""Multi-rater references for the commands: ``evaluate --rater`` and ``heatmap --rater``.

``evaluate PRED --rater A --rater B [--samples S ...]`` replaces the GT argument by two or
more rater folders (engine/raters.py); ``heatmap PRED --rater A --rater B --metric
rater-disagreement`` draws where the raters disagree: 1 − max_c q_c, the share of a
pixel's raters who did not give its most frequent label (docs/design/multi-rater.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.raters import dataset_names
from ..engine.raters import rater_map  # where raters disagree, per pixel
from ..errors import UsageError

RATER_NAMES = frozenset(dataset_names())


def check_no_rater_names(texts: Sequence[str]) -> None:
    """A usage error, before any work, for a requirement on a multi-rater score without
    --rater (those scores exist only against raters)."""
    from .requirements import parse_requirement

    for req in map(parse_requirement, texts):
        if req.klass is None and req.metric in RATER_NAMES:
            raise UsageError(
                f"--require {req.text!r}: {req.metric} is computed against raters; pass "
                "--rater DIR at least twice instead of GT"
            )


def rater_run(gt, raters: Sequence[str] | None, samples: Sequence[str] | None, reqs, *,
              scheduler=None, heatmaps: int = 0):  # fmt: skip
    """The evaluation function of ``evaluate --rater``: ``run(pred, None, **options)``,
    after the checks that the command line fits together."""
    if not raters:
        raise UsageError("--samples needs --rater: the samples are compared with the raters")
    if gt is not None:
        raise UsageError(
            f"pass GT or --rater folders, not both (got GT {gt} and {len(raters)} --rater)"
        )
    if len(raters) < 2:
        raise UsageError(
            f"--rater needs at least two rater folders (got {len(raters)}); give --rater once "
            "per rater, or pass one target as GT"
        )
    if heatmaps:
        raise UsageError(
            "--heatmaps draws KL against one target; with --rater draw maps with "
            "klseg heatmap PRED --rater DIR --rater DIR --metric rater-disagreement"
        )
    from ..engine.raters import dask_evaluate_raters, evaluate_raters

    def run(pred, _gt, **options):
        if scheduler:
            options["scheduler"] = scheduler
            return dask_evaluate_raters(pred, list(raters), samples=list(samples or ()),
                                        **options)  # fmt: skip
        return evaluate_raters(pred, list(raters), samples=list(samples or ()), **options)

    return run


__all__ = ["check_no_rater_names", "rater_map", "rater_run"]
