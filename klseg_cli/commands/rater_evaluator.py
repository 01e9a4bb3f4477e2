"""``RaterEvaluator``: multi-rater scores from arrays, in a notebook or a training loop.

An ``Evaluator`` whose target is the raters' frequency map: ``update_raters(pred, raters)``
takes a prediction and the raters' label masks (R, H, W) of one image (or a batch with a
leading N) and goes through the same code as ``klseg evaluate PRED --rater ...``
(``engine.raters.rater_image_stats``), so the numbers are exactly the CLI's. It keeps the
§2 sums and, per image, the multi-rater counts (``core.raters.RaterStats``, a few hundred
integers); two merge with ``merge``.

Example::

    ev = RaterEvaluator(5, ignore_index=255)
    for probs, masks in loader:               # (C, H, W) and (R, H, W)
        ev.update_raters(probs, masks)
    ev.compute()["dataset"]["ged_image_mean"]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.raters import RaterStats, dataset_values, rater_values, soft_dice_per_class
from ..core.stats import Stats
from ..errors import ShapeError, UsageError
from .evaluator import Evaluator, _labels, as_numpy

__all__ = ["RaterEvaluator"]


class RaterEvaluator(Evaluator):
    """``Evaluator`` against several raters (``soft_gt`` is implied: the target is q)."""

    def __init__(self, num_classes: int | None = None, **options) -> None:
        for name in ("soft_gt", "smoothing", "calibration_views"):
            if options.get(name):
                raise UsageError(f"RaterEvaluator makes the target from the raters: no {name}")
        options.pop("soft_gt", None)
        if options.get("settings") is None:
            super().__init__(num_classes, soft_gt=True, **options)
        else:
            super().__init__(num_classes, **options)

    def reset(self) -> None:
        super().reset()
        self._raters: list[tuple[str, RaterStats]] = []

    def update(self, pred: Any, target: Any, **kwargs) -> Stats:
        raise UsageError("RaterEvaluator takes raters' masks: use update_raters(pred, raters)")

    def update_raters(
        self,
        pred: Any,
        raters: Any,
        *,
        samples: Any = None,
        stems: str | Sequence[str] | None = None,
    ) -> Stats:
        """Add one image — ``pred`` (C, H, W) / (H, W, C), ``raters`` (R, H, W) integer
        masks, ``samples`` (S, C, H, W) / (S, H, W, C) sampled maps or None — or a batch
        with a leading N on each. Returns the §2 sums of what was added."""
        from ..engine.raters import rater_image_stats
        from ..io.raters import RaterMasks

        P, Y = as_numpy(pred, "pred"), as_numpy(raters, "raters")
        S = None if samples is None else as_numpy(samples, "samples")
        batched = Y.ndim == 4
        if not batched:
            P, Y = P[None], Y[None]
            S = None if S is None else S[None]
        if Y.ndim != 4 or Y.shape[1] < 2:
            raise ShapeError(f"raters must be (R, H, W) with R ≥ 2 masks, got {Y.shape[1:]}")
        if P.shape[0] != Y.shape[0] or (S is not None and S.shape[0] != Y.shape[0]):
            raise ShapeError(f"a batch of {P.shape[0]} predictions and {Y.shape[0]} rater sets")
        if isinstance(stems, str):
            stems = [stems]
        if stems is not None and len(stems) != P.shape[0]:
            raise UsageError(f"{len(stems)} stems for a batch of {P.shape[0]} images")
        added = Stats.zeros(self.settings.num_classes, self.settings.ece_bins)
        for i in range(P.shape[0]):
            stem = stems[i] if stems is not None else f"{self.n_images:09d}"
            where = f"image {stem}"
            names = [Path(f"{where} (rater {r})") for r in range(Y.shape[1])]
            masks = [_labels(Y[i, r], str(names[r])) for r in range(Y.shape[1])]
            masks = RaterMasks(names, self.settings.labels, masks=masks)
            pm = self._map(P[i], masks.shape, where)
            smaps = [] if S is None else [
                self._map(S[i, k], masks.shape, f"{where} (sample {k})") for k in range(S.shape[1])
            ]  # fmt: skip
            for m in (pm, *smaps):
                if m.num_classes != self.settings.num_classes or (m.height, m.width) != masks.shape:
                    raise ShapeError(
                        f"{m.path}: shape {m.array.shape} does not fit {self.settings.num_classes}"
                        f" classes and the raters' masks {masks.shape}"
                    )
            stats, counts = rater_image_stats(pm, masks, self.settings, samples=smaps,
                                              chunk_pixels=self.chunk_pixels)  # fmt: skip
            self.add(stats, stem=stem, height=pm.height, width=pm.width)
            self._raters.append((stem, counts))
            added = added + stats
        return added

    def merge(self, other: Evaluator) -> RaterEvaluator:
        if not isinstance(other, RaterEvaluator):
            raise UsageError("RaterEvaluator.merge takes a RaterEvaluator")
        super().merge(other)
        self._raters.extend(other._raters)
        return self

    def compute(self) -> dict:
        """``Evaluator.compute()`` plus the multi-rater scores (docs/design/multi-rater.md):
        ``dataset`` gains ``soft_dice_*``, ``ged_*``, ``miou_vs_raters_*``,
        ``rater_pairwise_miou_*``; ``classes`` and ``images`` their columns."""
        out = super().compute()
        classes = self.settings.mean_classes
        by_stem = dict(self._raters)
        values, total = dataset_values([c for _, c in sorted(self._raters)], classes)
        out["dataset"].update(values)
        per_class = soft_dice_per_class(total) if total is not None else []
        for row, value in zip(out["classes"], per_class):
            row["soft_dice"] = float(value)
        for row in out["images"]:
            if row["image"] in by_stem:
                row.update(rater_values(by_stem[row["image"]], classes))
        return out

    def __repr__(self) -> str:
        return super().__repr__().replace("Evaluator(", "RaterEvaluator(", 1)
