"""What an evaluation returns: each image's sums (``ImageResult``) and the run's
(``EvaluationResult``: its rows, tables and ``summary.json`` object), with the options the
files were read with. Built by the engine, from a saved ``stats.npz`` (``statsfile``), and
read by the reports."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import KlsegWarning
from .chunks import DEFAULT_CHUNK_PIXELS
from .metrics import MetricSettings
from .stats import (
    IMAGE_COLUMNS,
    Stats,
    class_means_cover,
    class_metrics,
    dataset_metrics,
    image_class_rows,
    pixel_metrics,
)

if TYPE_CHECKING:  # io imports this module
    from ..io.network import NetworkSettings


@dataclass(frozen=True)
class ReadOptions:
    """How files are read (nothing here changes a number)."""

    layout: str | None = None
    npz_key: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS
    accelerate: bool | None = None  # the compiled kernel: None = for large maps
    spatial_dims: int = 2  # 3: .npy/.npz volumes (X, Y, Z[, C]); NIfTI files are always 3
    allow_affine_mismatch: bool = False  # NIfTI pairs whose affines or spacings differ
    network: NetworkSettings | None = None  # remote reads' bounds (None: the environment's)
    strict_zarr: bool = False  # a missing Zarr chunk is an error, not the fill value
    read_ahead: bool = False  # a thread reads the next chunk during the kernel (one worker)


@dataclass
class ImageResult:
    stem: str
    pred_path: Path
    target_path: Path | None
    height: int
    width: int
    stats: Stats
    shape: tuple[int, ...] | None = None  # a volume's (X, Y, Z) (volumes.py); None: (H, W)
    boundary: dict[str, np.ndarray] | None = None  # --boundary: {metric: (C,)} (boundary.py)
    zarr_missing: dict | None = None  # {store: (missing chunk keys, fill value)} (zarrio.py)

    def row(self, settings: MetricSettings) -> dict:
        """This image's ``per_image.csv`` row."""
        values = pixel_metrics(self.stats, settings)
        row = {
            "image": self.stem,
            "height": self.height,
            "width": self.width,
            "n_valid": self.stats.n_valid,
        }
        row.update({k: values[k] for k in IMAGE_COLUMNS[4:]})
        if settings.uncertainty:  # --uncertainty: mean score, AUROC ... (uncertainty.py)
            from ..core.uncertainty import stats_image_values

            row.update(stats_image_values(self.stats, settings))
        if self.shape is not None or self.boundary is not None:
            from .boundary import image_values

            row.update(shape_columns(self.shape))
            row.update(image_values(self.boundary) if self.boundary is not None else {})
        return row


@dataclass
class EvaluationResult:
    settings: MetricSettings
    images: list[ImageResult]
    missing_predictions: list[Path] = field(default_factory=list)
    unpaired_predictions: list[Path] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    read: ReadOptions = field(default_factory=ReadOptions)

    @classmethod
    def of(cls, job, images: list[ImageResult], errors: list[dict]) -> EvaluationResult:
        """The result of a job's images (local or from a cluster) and input errors; ``job``
        is an ``engine.local.Job``."""
        return cls(
            settings=job.settings,
            images=images,
            missing_predictions=job.pairing.missing_pred,
            unpaired_predictions=job.pairing.missing_target,
            errors=errors,
            read=job.read,
        )

    @property
    def total(self) -> Stats:
        total = Stats.zeros(self.settings.num_classes, self.settings.ece_bins)
        for image in self.images:
            total = total + image.stats
        return total

    def image_rows(self) -> list[dict]:
        return [image.row(self.settings) for image in sorted(self.images, key=lambda i: i.stem)]

    def class_rows(self) -> list[dict]:
        return _with_boundary_means(class_metrics(self.total, self.settings), self)

    def image_class_rows(self) -> list[dict]:
        """Rows of ``per_image_class.csv``: every class of every image, in stem order."""
        rows = []
        for image in sorted(self.images, key=lambda i: i.stem):
            own = image_class_rows(image.stem, image.stats, self.settings)
            for metric, values in (image.boundary or {}).items():
                for row, value in zip(own, values):
                    row[metric] = float(value)
            rows.extend(own)
        return rows

    def summary(self) -> dict:
        """The ``summary.json`` object (DESIGN §5); NaN stays NaN until it is written."""
        total = self.total
        images = self.image_rows()
        return {
            "klseg_version": __version__,
            "settings": self.settings.as_dict(),
            "n_images": len(self.images),
            "n_valid": total.n_valid,
            "n_clipped": total.n_clipped,
            "unit": self.settings.unit,
            "class_means": class_means_cover(self.settings),
            "dataset": _with_boundary_dataset(
                dataset_metrics(images, total, self.settings), self, images
            ),
            "classes": _with_boundary_means(class_metrics(total, self.settings), self),
            **_uncertainty_section(total, self.settings),
            "images": images,
            "requirements": [],
            "missing_predictions": [str(p) for p in self.missing_predictions],
            "errors": list(self.errors),
            "zarr_missing_chunks": zarr_missing_summary(self.images),
        }

    def warn_missing_chunks(self) -> None:
        """One warning per Zarr store that had chunks missing (read as the fill value)."""
        for entry in zarr_missing_summary(self.images)["files"]:
            message = missing_message(entry["file"], entry["chunks"], entry["fill_value"])
            warnings.warn(message, KlsegWarning, stacklevel=2)


def missing_message(store: str, n: int, fill) -> str:
    """The warning for ``n`` chunks of ``store`` read as the fill value."""
    return (
        f"{store}: {n} Zarr chunk{'s' if n != 1 else ''} missing, read as the fill value "
        f"{fill!r} (a sparse array, or lost chunks? --strict-zarr makes this an error)"
    )


def merge_missing(into: dict | None, more: dict | None) -> dict | None:
    """Two ``ImageResult.zarr_missing`` records as one (the chunk keys united)."""
    if not more:
        return into
    out = dict(into or {})
    for store, (keys, fill) in more.items():
        held = out.get(store)
        out[store] = (keys | held[0], fill) if held else (keys, fill)
    return out


def zarr_missing_summary(images) -> dict:
    """summary.json's ``zarr_missing_chunks``: the total and, per store, how many chunks
    were missing and the fill value they were read as."""
    stores: dict | None = None
    for image in images:
        stores = merge_missing(stores, image.zarr_missing)
    files = [
        {"file": store, "chunks": len(keys), "fill_value": fill}
        for store, (keys, fill) in sorted((stores or {}).items())
    ]
    return {"total": sum(f["chunks"] for f in files), "files": files}


def _uncertainty_section(total: Stats, settings: MetricSettings) -> dict:
    """``--uncertainty``: summary.json's ``uncertainty`` object (bounds, thresholds)."""
    if not settings.uncertainty:
        return {}
    from ..core.uncertainty import summary_section

    return {"uncertainty": summary_section(total, settings)}


def _with_boundary_means(rows: list[dict], result: EvaluationResult) -> list[dict]:
    """``--boundary``: each class row gets the mean of its per-image boundary values."""
    if result.settings.boundary is None:
        return rows
    from .boundary import class_means

    means = class_means(
        [i.boundary for i in result.images if i.boundary is not None], result.settings.num_classes
    )
    for c, row in enumerate(rows):
        row.update({metric: values[c] for metric, values in means.items()})
    return rows


def _with_boundary_dataset(dataset: dict, result: EvaluationResult, image_rows) -> dict:
    """``--boundary``: ``hd95_image_mean`` ... over the images where each is defined."""
    if result.settings.boundary is None:
        return dataset
    from .boundary import dataset_values

    return dataset | dataset_values(image_rows)


def shape_columns(shape: tuple[int, ...] | None) -> dict:
    """A volume's per-image columns: height, width, depth = its X, Y, Z (file order)."""
    if shape is None or len(shape) != 3:
        return {}
    return {"height": int(shape[0]), "width": int(shape[1]), "depth": int(shape[2])}
