"""The public accumulator: klseg's numbers from arrays, in a notebook or a training loop.

``Evaluator`` keeps what the folder evaluation keeps — a ``Stats`` of sums (merged with
``+``) and one row of per-image values for the ``*_image_mean`` metrics — and none of the
pixels, so it is small and picklable and two of them merge (processes, ranks, machines).
Each image goes through the same core as a file does (``evaluation.image_stats`` on a
``readers.PredictionMap`` over the in-memory array): the same chunking, the same compiled
kernel for large float32 maps, the same checks, so the numbers are exactly the CLI's.

Example (a training loop)::

    ev = klseg_cli.Evaluator(19, ignore_index=255)
    for images, labels in loader:
        ev.update(model(images).softmax(1), labels)   # (N, C, H, W) and (N, H, W)
    ev.compute()["dataset"]["miou_pooled"]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.labels import LabelMap
from ..core.metrics import DEFAULT_EPS, MetricSettings
from ..core.stats import IMAGE_COLUMNS, Stats, class_means_cover, class_metrics, dataset_metrics
from ..errors import LabelError, ShapeError, UsageError
from ..io.readers import PredictionMap, _check_float_dtype, detect_layout

__all__ = ["Evaluator", "as_numpy"]

_IMAGE_VALUES = IMAGE_COLUMNS[4:]  # the metrics of a per_image.csv row after its counts


def as_numpy(x: Any, what: str = "array") -> np.ndarray:
    """A NumPy view of ``x``: an ndarray, anything with ``__array__`` or ``__dlpack__``
    (a CPU torch or JAX array: no copy through DLPack, and klseg never imports torch).

    A path is a usage error (files go to ``klseg_cli.evaluate``), and so is an object that
    is no array, or a tensor NumPy cannot see (on a GPU, needing grad): one message saying
    what to do, never a bare ``TypeError``.
    """
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (str, bytes, os.PathLike)):
        raise UsageError(
            f"Evaluator.update takes arrays, not paths ({what} is {str(x)!r}); evaluate "
            "files with klseg_cli.evaluate(PRED, GT)"
        )
    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    problem = None
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except Exception as err:  # a GPU tensor, one needing grad, a dtype NumPy lacks
            problem = f"{type(err).__name__}: {err}"
    if hasattr(x, "__array__"):
        try:
            return np.asarray(x)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
    if problem is None:
        raise UsageError(
            f"{what} must be an array (NumPy, or anything with __array__ or __dlpack__), got {kind}"
        )
    raise UsageError(
        f"{what} ({kind}) cannot be read as a NumPy array on the CPU ({problem}); pass "
        "x.detach().cpu() (torch) or a NumPy array"
    )


def _labels(arr: np.ndarray, what: str) -> np.ndarray:
    """A label mask's checks (as ``readers.read_target``): 2-D integers, bool as 0/1."""
    if arr.ndim != 2:
        raise ShapeError(f"{what}: a label mask must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        hint = " (pass soft_gt=True for a soft target map)" if arr.dtype.kind == "f" else ""
        raise LabelError(f"{what}: holds {arr.dtype} values; labels must be integers{hint}")
    return arr


class Evaluator:
    """Sums of KL, CE, JS, entropy, Brier, the confusion matrix and ECE bins over the
    images given to ``update``; ``compute()`` gives summary.json's numbers.

    The options are the CLI's (``klseg evaluate --help``) under the same names. ``update``
    takes one image — (C, H, W), (H, W, C) or (H, W) for a binary P(class 1) — or a batch
    with a leading N, against a label mask (H, W) / (N, H, W), or with ``soft_gt`` a soft
    target of the prediction's shape. The class axis is found against the target's
    (H, W) as for files; ``layout`` settles a square map with H = W = C.

    ``keep_images`` (default True) keeps one row of per-image values (about 15 numbers
    an image): the ``*_image_mean`` metrics and ``compute()["images"]`` need them; with
    False only the pooled metrics are defined (the image means are NaN).

    ``uncertainty=("entropy",)`` (scores: entropy, maxprob, margin) adds failure detection
    (``auroc_entropy_pooled`` ..., DESIGN §11): 1 MiB of histograms per score in the
    running total (per-image values are taken when an image is added, then only its row
    is kept).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        classes: Sequence[str] | None = None,
        ignore_index: int | Sequence[int] | None = None,
        label_map: str | Path | LabelMap | None = None,
        reduce_zero_label: bool = False,
        smoothing: float = 0.0,
        eps: float = DEFAULT_EPS,
        input_kind: str = "probs",
        soft_gt: bool = False,
        log_base: float = math.e,
        renormalize: bool = False,
        exclude_class: Sequence[str | int] = (),
        temperature: float = 1.0,
        calibration_views: bool = False,
        boundary_band: int = 3,
        layout: str | None = None,
        chunk_pixels: int | None = None,
        accelerate: bool | None = None,
        keep_images: bool = True,
        settings: MetricSettings | None = None,
        uncertainty: Sequence[str] = (),
        qc_threshold: float = 0.5,
    ) -> None:
        from ..core.chunks import DEFAULT_CHUNK_PIXELS
        from ..engine.local import class_names_and_map, metric_settings

        if settings is None:
            names, label_map = class_names_and_map(tuple(classes or ()), label_map)
            if num_classes is None:
                if not names:
                    raise UsageError("Evaluator needs num_classes (or classes=[names])")
                num_classes = len(names)
            settings = metric_settings(
                num_classes, names, label_map, ignore_index=ignore_index,
                exclude_class=exclude_class, eps=eps, smoothing=smoothing,
                input_kind=input_kind, log_base=log_base, soft_gt=soft_gt,
                renormalize=renormalize, reduce_zero_label=reduce_zero_label,
                temperature=temperature, calibration_views=calibration_views,
                boundary_band=boundary_band,
                **({"uncertainty": tuple(uncertainty), "qc_threshold": qc_threshold}
                   if uncertainty else {}),
            )  # fmt: skip
        self.settings = settings
        self.layout = layout
        self.chunk_pixels = chunk_pixels or DEFAULT_CHUNK_PIXELS
        self.accelerate = accelerate
        self.keep_images = keep_images
        self.reset()

    # --- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every image (the settings stay)."""
        self.total = Stats.zeros(self.settings.num_classes, self.settings.ece_bins)
        self.n_images = 0
        self._rows: list[dict] = []

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # --- adding images ---------------------------------------------------------------------

    def update(
        self,
        pred: Any,
        target: Any,
        *,
        stems: str | Sequence[str] | None = None,
    ) -> Stats:
        """Add one image or a batch; returns the sums of what was added.

        ``stems``: names of the images (their ``per_image`` rows); by default the running
        number of the image, zero-padded so that names sort in the order of updates.
        """
        P = as_numpy(pred, "pred")
        T = as_numpy(target, "target")
        soft = self.settings.soft_gt
        batched = P.ndim == 4 or (P.ndim == 3 and T.ndim == (4 if soft else 3))
        if not batched:
            P, T = P[None], T[None]
        if P.shape[0] != T.shape[0]:
            raise ShapeError(f"a batch of {P.shape[0]} predictions and {T.shape[0]} targets")
        if isinstance(stems, str):
            stems = [stems]
        if stems is not None and len(stems) != P.shape[0]:
            raise UsageError(f"{len(stems)} stems for a batch of {P.shape[0]} images")
        added = Stats.zeros(self.settings.num_classes, self.settings.ece_bins)
        for i in range(P.shape[0]):
            stem = stems[i] if stems is not None else f"{self.n_images:09d}"
            stats, hw = self._image(P[i], T[i], stem)
            self.add(stats, stem=stem, height=hw[0], width=hw[1])
            added = added + stats
        return added

    def _image(self, P: np.ndarray, T: np.ndarray, stem: str) -> tuple[Stats, tuple[int, int]]:
        from ..engine.image import image_stats

        settings, where = self.settings, f"image {stem}"
        _check_float_dtype(P.dtype, where)
        if settings.soft_gt:
            _check_float_dtype(T.dtype, where)
            hw = None
            for cand in (T.shape[:2], T.shape[1:]):
                if T.ndim == 3 and (cand == P.shape[:2] or cand == P.shape[1:]):
                    hw = tuple(cand)
                    break
            target: np.ndarray | PredictionMap = self._map(T, hw, f"{where} (target)")
            if target.num_classes != settings.num_classes:
                raise ShapeError(f"{where}: soft target has {target.num_classes} classes")
        else:
            target = _labels(T, f"{where} (target)")
            hw = target.shape
        pm = self._map(P, hw, where)
        if pm.num_classes != settings.num_classes:
            raise ShapeError(
                f"{where}: has {pm.num_classes} classes ({pm.layout.upper()} shape "
                f"{P.shape}), expected {settings.num_classes}"
            )
        stats = image_stats(
            pm, target, settings, chunk_pixels=self.chunk_pixels, accelerate=self.accelerate
        )
        return stats, (pm.height, pm.width)

    def _map(self, arr: np.ndarray, hw, where: str) -> PredictionMap:
        layout = detect_layout(
            arr.shape, hw, layout=self.layout, num_classes=self.settings.num_classes, path=where
        )
        if arr.ndim == 3 and not arr.flags.c_contiguous:  # e.g. torch's channels_last
            other = np.moveaxis(arr, 0, -1) if layout == "chw" else np.moveaxis(arr, -1, 0)
            if other.flags.c_contiguous:  # the same memory read in its stored order
                arr, layout = other, "hwc" if layout == "chw" else "chw"
            else:  # one copy of the image, not one per chunk
                arr = np.ascontiguousarray(arr)
        elif not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        pm = PredictionMap(path=Path(where), array=arr, layout=layout)
        if pm.n_pixels == 0:
            raise ShapeError(f"{where}: shape {arr.shape} has no pixels")
        return pm

    def add(self, stats: Stats, *, stem: str, height: int = 0, width: int = 0) -> None:
        """Add the sums of one image computed elsewhere (a worker, ``evaluate_pair``)."""
        from ..core.stats import pixel_metrics

        self.total = self.total + stats
        self.n_images += 1
        if self.keep_images:
            values = pixel_metrics(stats, self.settings)
            row = {"image": stem, "height": height, "width": width, "n_valid": stats.n_valid}
            row.update({k: values[k] for k in _IMAGE_VALUES})
            if self.settings.uncertainty:  # --uncertainty: mean score, AUROC ... per image
                from ..core.uncertainty import stats_image_values

                row.update(stats_image_values(stats, self.settings))
            self._rows.append(row)

    @classmethod
    def from_result(cls, result) -> Evaluator:
        """The accumulator of a folder evaluation (``klseg_cli.evaluate``'s result): its
        settings and images, in pair order, e.g. to merge with images evaluated elsewhere."""
        if getattr(result.settings, "boundary", None) is not None:
            raise UsageError(
                "Evaluator.from_result keeps sums only: boundary metrics (--boundary) are "
                "per image and class, not sums; use the result's summary() for them"
            )
        ev = cls(settings=result.settings, layout=result.read.layout)
        for image in result.images:
            ev.add(image.stats, stem=image.stem, height=image.height, width=image.width)
        return ev

    def merge(self, other: Evaluator) -> Evaluator:
        """Add another accumulator's images to this one (same settings); returns self."""
        if not isinstance(other, Evaluator):
            raise UsageError(f"Evaluator.merge takes an Evaluator, got {type(other).__name__}")
        if other.settings != self.settings:
            raise UsageError("cannot merge Evaluators with different settings")
        self.total = self.total + other.total
        self.n_images += other.n_images
        self._rows.extend(other._rows)
        self.keep_images = self.keep_images and other.keep_images
        return self

    def __iadd__(self, other: Evaluator) -> Evaluator:
        return self.merge(other)

    # --- results ---------------------------------------------------------------------------

    def image_rows(self) -> list[dict]:
        """The ``per_image.csv`` rows kept, in stem order (empty with keep_images=False)."""
        return sorted(self._rows, key=lambda r: r["image"]) if self.keep_images else []

    def compute(self) -> dict:
        """summary.json's numbers: ``dataset`` and ``classes`` (and ``images`` when kept),
        with the counts, unit and settings they depend on. NaN where undefined."""
        settings, total = self.settings, self.total
        rows = self.image_rows()
        return {
            "settings": settings.as_dict(),
            "n_images": self.n_images,
            "n_valid": total.n_valid,
            "n_clipped": total.n_clipped,
            "unit": settings.unit,
            "class_means": class_means_cover(settings),
            "dataset": dataset_metrics(rows, total, settings),
            "classes": class_metrics(total, settings),
            "images": rows,
        }

    def __repr__(self) -> str:
        return (
            f"Evaluator(num_classes={self.settings.num_classes}, n_images={self.n_images}, "
            f"n_valid={self.total.n_valid})"
        )
