"""Per-pixel metric maps (``klseg heatmap``, ``compare --heatmaps``, the worst images of
``evaluate --heatmaps``): one pass over a prediction, with the same core and chunking as
``evaluate``, into a float32 (H, W) map, kept in memory for ordinary images and in a
temporary file for huge ones. Drawing them is ``render/heatmap``'s."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.chunks import DEFAULT_CHUNK_PIXELS, chunk_for
from ..core.metrics import MetricSettings, prediction_terms
from ..errors import InputError, UsageError
from ..io.pairing import OpenedPair
from ..io.readers import PredictionMap, read_palette, sum_tolerance
from ..io.volumes import SliceView, VolumePair, slice_pair
from .image import iter_terms

HEATMAP_METRICS = (
    "kl",
    "ce",
    "js",
    "entropy",
    "error",
    "confidence",
    "rater-disagreement",
    "uncertainty-error",
)
FIXED_RANGE = {
    "error": 1.0,
    "confidence": 1.0,
    "rater-disagreement": 1.0,
    "uncertainty-error": 3.0,
}  # vmin 0


TARGET_FREE_METRICS = ("entropy", "confidence")


INFORMATION_METRICS = ("kl", "ce", "js", "entropy")  # in nats or bits


IN_MEMORY_PIXELS = 1 << 24
"""Metric maps up to this many pixels (64 MB of float32) stay in memory; larger ones go to
a temporary file, so memory stays bounded by the band size."""


BAND_PIXELS = 1 << 20


@dataclass
class MetricMap:
    """A per-pixel metric (NaN where ignored), with what the panels need."""

    metric: str
    values: np.ndarray  # (H, W) float32
    pred: np.ndarray | None  # (H, W) predicted class, for --panel
    labels: np.ndarray | None  # (H, W) raw target labels, for --panel
    unit: str
    codes: object = None  # raw labels → class codes (LabelSpec.codes); negative: ignored
    palette: np.ndarray | None = None  # (256, 3) colours of a palette PNG target
    wrong: np.ndarray | None = None  # uncertainty-error: (H, W) uint8 [argmax ≠ label]
    threshold: float = math.nan  # uncertainty-error: the image's UEO threshold

    @property
    def height(self) -> int:
        return self.values.shape[0]

    @property
    def width(self) -> int:
        return self.values.shape[1]


def _unit(metric: str, settings: MetricSettings) -> str:
    return settings.unit if metric in INFORMATION_METRICS else ""


class DiskMap:
    """An (H, W) array kept in an unlinked temporary file, read and written by rows.

    Used for maps too large for memory. Explicit ``pread``/``pwrite`` instead of a memory
    map: pages written through a map stay in the process's resident set, these do not.
    """

    def __init__(self, shape: tuple[int, int], dtype, fill) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        self._fh = tempfile.TemporaryFile(prefix="klseg-map-")
        row = np.full(shape[1], fill, dtype=self.dtype).tobytes()
        rows = max(1, BAND_PIXELS // shape[1])
        band = row * rows
        for r in range(0, shape[0], rows):
            self._fh.write(band[: len(row) * min(rows, shape[0] - r)])
        self._fh.flush()

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def write_flat(self, start: int, values: np.ndarray) -> None:
        """Write pixels [start, start + len(values)) in row-major order."""
        data = np.ascontiguousarray(values, dtype=self.dtype)
        os.pwrite(self._fh.fileno(), data.tobytes(), start * self.dtype.itemsize)

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("DiskMap reads contiguous row ranges only")
        W, item = self.shape[1], self.dtype.itemsize
        out = np.empty((max(r1 - r0, 0), W), dtype=self.dtype)
        if out.size:
            os.preadv(self._fh.fileno(), [memoryview(out).cast("B")], r0 * W * item)
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self[0 : self.shape[0]]
        return arr if dtype is None else arr.astype(dtype)


def _empty(shape: tuple[int, int], dtype, fill):
    """An (H, W) map: in memory, or in a temporary file when it is large."""
    if shape[0] * shape[1] <= IN_MEMORY_PIXELS:
        return np.full(shape, fill, dtype=dtype)
    return DiskMap(shape, dtype, fill)


def _put(target, start: int, stop: int, values: np.ndarray, valid: np.ndarray | None, fill):
    """Store one chunk's values (for its valid pixels) at flat pixels [start, stop)."""
    if isinstance(target, np.ndarray):
        flat = target.reshape(-1)
        if valid is None:
            flat[start:stop] = values
        else:
            flat[start:stop][valid] = values
        return
    if valid is not None:
        full = np.full(stop - start, fill, dtype=target.dtype)
        full[valid] = values
        values = full
    target.write_flat(start, values)


def compute_map(
    opened: OpenedPair,
    settings: MetricSettings,
    metric: str,
    *,
    with_pred: bool = False,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    target_path: Path | None = None,
) -> MetricMap:
    """The per-pixel ``metric`` of one prediction (against its target where it needs one)."""
    if metric not in HEATMAP_METRICS:
        raise UsageError(f"unknown metric {metric!r}")
    if opened.target is None and metric not in TARGET_FREE_METRICS:
        raise UsageError(f"--metric {metric} needs a target; only entropy and confidence do not")
    H, W = opened.height, opened.width
    values = _empty((H, W), np.float32, np.nan)
    pred_map = _empty((H, W), np.uint16, 0) if with_pred else None
    scale = math.log(settings.log_base) if metric in INFORMATION_METRICS else 1.0

    if opened.target is None:
        logits = settings.input_kind == "logits"
        tol = None if logits else sum_tolerance(opened.pred.array.dtype)
        n = opened.pred.n_pixels
        chunk_pixels = chunk_for(chunk_pixels, opened.pred.num_classes)
        for start in range(0, n, chunk_pixels):
            stop = min(start + chunk_pixels, n)
            try:
                pt = prediction_terms(
                    opened.pred.block(start, stop, logits=logits), settings, tolerance=tol
                )
            except InputError as err:
                raise err.with_path(opened.pred.path) from None
            v = (pt.entropy / scale) if metric == "entropy" else pt.confidence
            _put(values, start, stop, v, None, np.nan)
            if pred_map is not None:
                _put(pred_map, start, stop, pt.pred, None, 0)
        return MetricMap(metric, values, pred_map, None, _unit(metric, settings))

    if metric == "uncertainty-error":  # scores and errors (uncertainty_map.py)
        return _uncertainty_error_map(opened, settings, chunk_pixels=chunk_pixels,
                                      target_path=target_path, with_pred=with_pred)  # fmt: skip
    for start, stop, valid, terms in iter_terms(
        opened.pred, opened.target, settings, chunk_pixels=chunk_pixels, target_path=target_path
    ):
        if metric == "error":
            v = (terms.pred != terms.label).astype(np.float32)
        elif metric == "confidence":
            v = terms.confidence
        else:
            v = getattr(terms, metric) / scale
        _put(values, start, stop, v, valid, np.nan)
        if pred_map is not None:
            _put(pred_map, start, stop, terms.pred, valid, 0)
    labels = None if isinstance(opened.target, PredictionMap) else opened.target
    palette = read_palette(target_path) if (with_pred and target_path is not None) else None
    return MetricMap(
        metric, values, pred_map, labels, _unit(metric, settings), settings.labels.codes, palette
    )


def _uncertainty_error_map(opened, settings, *, chunk_pixels: int, target_path: Path | None,
                           with_pred: bool = False) -> MetricMap:  # fmt: skip
    """``--metric uncertainty-error``: the score map (NaN where ignored), the wrong-pixel
    map and the image's UEO threshold of one pair (``render/uncertainty_map`` draws it)."""
    from ..core.uncertainty import chunk_histograms, chunk_scores, failure_detection

    score = (settings.uncertainty or ("entropy",))[0]
    H, W = opened.height, opened.width
    values = _empty((H, W), np.float32, np.nan)
    wrong = _empty((H, W), np.uint8, 0)
    pred_map = _empty((H, W), np.uint16, 0) if with_pred else None
    hist = None
    for start, stop, valid, terms in iter_terms(
        opened.pred, opened.target, settings, chunk_pixels=chunk_pixels, target_path=target_path
    ):
        s = chunk_scores((score,), p=terms.p, confidence=terms.confidence, pred=terms.pred,
                         entropy=terms.entropy)  # fmt: skip
        w = terms.pred != terms.label
        h, _ = chunk_histograms(s, w)
        hist = h if hist is None else hist + h
        _put(values, start, stop, s[0], valid, np.nan)
        _put(wrong, start, stop, w.astype(np.uint8), valid, 0)
        if pred_map is not None:
            _put(pred_map, start, stop, terms.pred, valid, 0)
    t = failure_detection(hist[0])["ueo_threshold"] if hist is not None else math.nan
    labels = opened.target if isinstance(opened.target, np.ndarray) else None
    return MetricMap("uncertainty-error", values, pred_map, labels, score,
                     settings.labels.codes, wrong=wrong, threshold=t)  # fmt: skip


def pair_map(
    pair, settings: MetricSettings, read, metric: str, *, with_pred: bool, view=None
) -> MetricMap:
    """Open one prediction (and its target) and compute its per-pixel ``metric``
    (of a volume: the slices ``view`` names, see volumes.SliceView)."""
    from ..io.opening import open_pair

    opened = open_pair(pair, soft_gt=settings.soft_gt, num_classes=settings.num_classes, read=read)
    if getattr(opened, "file_shape", None) is not None:
        from ..io.volumes import SliceView

        return volume_map(opened, settings, metric, view or SliceView(), with_pred=with_pred,
                          chunk_pixels=read.chunk_pixels, target_path=pair.target)  # fmt: skip
    return compute_map(opened, settings, metric, with_pred=with_pred,
                       chunk_pixels=read.chunk_pixels, target_path=pair.target)  # fmt: skip


def volume_map(opened: VolumePair, settings, metric: str, view: SliceView, **kw):
    """The heatmap of a volume: one slice, or ``view.montage`` slices tiled in a grid (on
    one colour scale, ignored-colour gaps between them)."""

    n = opened.file_shape[view.axis]
    maps = [
        compute_map(slice_pair(opened, view.axis, i), settings, metric, **kw)
        for i in view.indices(n, opened.pred.path)
    ]
    if len(maps) == 1:
        return maps[0]
    cols = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / cols)
    h, w, gap = maps[0].height, maps[0].width, 2

    def tile(get, fill, dtype):
        if get(maps[0]) is None:
            return None
        out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap), fill, dtype)
        for k, mm in enumerate(maps):
            r, c = divmod(k, cols)
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = get(mm)
        return out

    ignore = settings.ignore_index[0] if settings.ignore_index else 255
    first = maps[0]
    return MetricMap(
        first.metric,
        tile(lambda m: np.asarray(m.values), np.nan, np.float32),
        tile(lambda m: None if m.pred is None else np.asarray(m.pred), 0, np.uint16),
        tile(lambda m: m.labels, ignore, first.labels.dtype if first.labels is not None else None),
        first.unit,
        first.codes,
        first.palette,
    )
