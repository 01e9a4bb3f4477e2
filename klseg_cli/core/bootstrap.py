"""Paired percentile bootstrap over images, from per-image sums alone (DESIGN §8).

A resample draws N images with replacement; it is a row of counts w (how often each image
was drawn). Every data-set metric of a resample is computed from the per-image sufficient
statistics, never from pixels:

- ``*_pooled``: the summed Stats of the resample are ``w @ X`` for each stacked Stats field
  X (N, ...), and the usual final formulas (``stats.pixel_metrics_batch``) turn them into
  metrics. R resamples at once are one matrix product (R, N) @ (N, ...).
- ``*_image_mean``: the per-image values v (computed once) are averaged with the counts as
  weights, over the images where v is defined: (w @ v) / (w @ [v defined]).

There is no Python loop over images or (for the metrics above) over resamples. "Paired":
two runs over the same images (a model and its baseline, or models A and B) are resampled
with the same counts, so the interval of their difference reflects image-to-image variation
once, not twice. Intervals are the 2.5th and 97.5th percentiles of the resampled values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import UsageError
from .metrics import MetricSettings
from .raters import dataset_names as rater_dataset_names
from .stats import Stats, dataset_metrics, pixel_metrics_batch

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95
BLOCK_ENTRIES = 1 << 22
"""Counts held at once (R_block × N): 32 MB of float64, whatever the number of resamples."""


def count_blocks(n_images: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resampling counts, (R_block, N) float64 blocks whose rows each sum to N.

    The block size depends on N only, so a seed always gives the same resamples.
    """
    if n_resamples < 1:
        raise UsageError(f"--bootstrap needs at least 1 resample, got {n_resamples}")
    rng = np.random.default_rng(seed)
    block = max(1, BLOCK_ENTRIES // max(n_images, 1))
    for r0 in range(0, n_resamples, block):
        b = min(block, n_resamples - r0)
        idx = rng.integers(0, n_images, size=(b, n_images))
        idx += (np.arange(b) * n_images)[:, None]
        counts = np.bincount(idx.reshape(-1), minlength=b * n_images)
        yield counts.reshape(b, n_images).astype(np.float64)


def resampled_totals(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Σ_i W[r, i]·X[i] for every resample r: (R, N) @ (N, ...) → (R, ...) float64.

    A NaN or ±inf in an image's sum (an undefined value, e.g. reverse KL against hard
    labels; an infinite one, reverse KL where q = 0 < p) makes the total NaN or ±inf in the
    resamples that drew that image, and only there: a plain product would spread it to all
    (0·NaN = 0·inf = NaN, with a "invalid value in matmul" warning). +inf and −inf drawn
    together make NaN. Integer sums stay exact below 2⁵³.
    """
    flat = X.reshape(X.shape[0], -1)
    if flat.dtype.kind == "f":
        finite = np.isfinite(flat)
        if finite.all():
            T = W @ flat
        else:
            T = W @ np.where(finite, flat, 0.0)
            pos = (W @ (flat == np.inf).astype(np.float64)) > 0
            neg = (W @ (flat == -np.inf).astype(np.float64)) > 0
            nan = (W @ np.isnan(flat).astype(np.float64)) > 0
            T[pos] = np.inf
            T[neg] = -np.inf
            T[nan | (pos & neg)] = np.nan
    else:
        T = W @ flat.astype(np.float64)
    return T.reshape((W.shape[0], *X.shape[1:]))


def weighted_means(W: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Count-weighted means of per-image values (N, k) over the defined (non-NaN) ones."""
    defined = ~np.isnan(values)
    finite = np.isfinite(values)
    num = W @ np.where(finite, values, 0.0)
    den = W @ defined.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    if not finite[defined].all():  # ±inf (a boundary distance): only where it was drawn
        pos = (W @ (values == np.inf).astype(np.float64)) > 0
        neg = (W @ (values == -np.inf).astype(np.float64)) > 0
        out = np.where(pos & neg, np.nan, np.where(pos, np.inf, np.where(neg, -np.inf, out)))
    return out


@dataclass
class Source:
    """What one run contributes to a bootstrap: per-image sums and values, in one image order.

    ``arrays``: Stats fields stacked per image (stats.npz's layout); ``image_values``: the
    per-image metric values (per_image.csv's columns), {name: (N,)}; ``names``: the data-set
    metrics to resample (summary.json's ``dataset`` keys).
    """

    arrays: Mapping[str, np.ndarray]
    image_values: Mapping[str, np.ndarray]
    settings: MetricSettings
    names: Sequence[str]
    batch: Callable | None = None  # the batched final formulas; None: pixel_metrics_batch
    rater_items: tuple[int, int] | None = None  # --rater: (raters R, samples S)
    rater_arrays: Mapping[str, np.ndarray] | None = None  # --rater: per-image counts

    @classmethod
    def from_run(cls, table, summary: Mapping) -> Source:
        """From a ``StatsTable`` and its summary (its ``images`` rows give the values)."""
        rows = {row["image"]: row for row in summary["images"]}
        image_values = {}
        from .uncertainty import is_image_level

        for name in summary["dataset"]:
            bases = [name[: -len("_image_mean")]] if name.endswith("_image_mean") else []
            if is_image_level(name):  # --uncertainty's Spearman, QC AUROC: image values
                bases = ["miou", "uncertainty_" + name.split("_")[-1]]
            for base in bases:
                image_values[base] = np.array(
                    [_number(rows[s].get(base)) for s in table.stems], dtype=np.float64
                )
        src = cls(table.arrays, image_values, table.metric_settings(), list(summary["dataset"]))
        if getattr(table, "rater_items", None) is not None:  # --rater: the pooled rater scores
            src.rater_items, src.rater_arrays = table.rater_items, table.rater_arrays
        return src

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values() or (self.rater_arrays or {}).values())))


def _number(value) -> float:
    return np.nan if value is None else float(value)


def covered(names: Sequence[str]) -> list[str]:
    """The data-set metrics computed in closed, vectorised form (the rest go resample by
    resample through ``stats.dataset_metrics``: correct, only slower)."""
    probe = {
        "sums": np.zeros((1, 6)),
        "confusion": np.zeros((1, 2, 2)),
        "ece_count": np.zeros((1, 1)),
        "ece_conf": np.zeros((1, 1)),
        "ece_correct": np.zeros((1, 1)),
    }
    pooled = set(pixel_metrics_batch(probe, MetricSettings(num_classes=2)))
    from .uncertainty import PIXEL_NAMES, SCORES, is_image_level  # --uncertainty

    pooled |= {f"{q}_{s}" for q in PIXEL_NAMES for s in SCORES}  # uncertainty.pooled_batch
    from .raters import RATER_METRICS

    pooled |= set(RATER_METRICS)  # --rater: raters.rater_values_batch (stats.npz's counts)
    return [
        n for n in names
        if n.endswith("_image_mean") or (n.endswith("_pooled") and n[: -len("_pooled")] in pooled)
        or is_image_level(n)
    ]  # fmt: skip


class _Totals(Mapping):
    """Resampled totals of per-image arrays, each computed on first use (W @ X)."""

    def __init__(self, W: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        self._W, self._arrays, self._done = W, arrays, {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._done:
            self._done[key] = resampled_totals(self._W, self._arrays[key])
        return self._done[key]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def _with_confusion_parts(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` plus each image's confusion diagonal and margins (``stats.confusion_parts``):
    what the batched formulas read, C numbers per image instead of C² (150 classes: 450
    columns to resample instead of 22,500)."""
    out = dict(arrays)
    if "confusion" in arrays and not {"tp", "n_target", "n_pred"} & set(arrays):
        cm = arrays["confusion"]
        out["tp"] = np.diagonal(cm, axis1=-2, axis2=-1)
        out["n_target"], out["n_pred"] = cm.sum(axis=-1), cm.sum(axis=-2)
    if "unc_hist" in arrays:  # --uncertainty: resampled on the coarse grid (uncertainty.py)
        from .uncertainty import coarsen

        out["unc_coarse"] = coarsen(arrays["unc_hist"])
    return out


def _samples(W: np.ndarray, src: Source, prepared=None) -> dict[str, np.ndarray]:
    """Every data-set metric of ``src`` for each resample (row) of ``W``."""
    totals = _Totals(W, prepared if prepared is not None else _with_confusion_parts(src.arrays))
    pooled = (src.batch or pixel_metrics_batch)(totals, src.settings)
    bases = list(src.image_values)
    means = (
        weighted_means(W, np.stack([src.image_values[b] for b in bases], axis=1))
        if bases
        else np.empty((W.shape[0], 0))
    )
    out: dict[str, np.ndarray] = {}
    from .uncertainty import image_level_batch, is_image_level

    image_level = [name for name in src.names if is_image_level(name)]
    if image_level:  # --uncertainty's image-level values, resample by resample
        out.update(image_level_batch(W, src.image_values, image_level, src.settings))
    if src.rater_items is not None:  # --rater: the pooled scores from the summed counts
        out.update(_rater_pooled(W, src))
    slow = []
    for name in src.names:
        if name in out:
            continue
        if name.endswith("_image_mean") and name[: -len("_image_mean")] in src.image_values:
            out[name] = means[:, bases.index(name[: -len("_image_mean")])]
        elif name.endswith("_pooled") and name[: -len("_pooled")] in pooled:
            out[name] = pooled[name[: -len("_pooled")]]
        elif name not in _RATER_POOLED:  # those need the counts (a stats.npz before them)
            slow.append(name)
    if slow and src.batch is None:  # a metric without a batched formula: one Stats per resample
        kinds = {name: X.dtype.kind for name, X in src.arrays.items()}
        values = {name: np.empty(W.shape[0]) for name in slow}
        for r in range(W.shape[0]):
            stats = Stats(**{
                name: (np.rint(T[r]).astype(np.int64) if kinds[name] == "i" else T[r].copy())
                if T[r].ndim else (round(T[r]) if kinds[name] == "i" else float(T[r]))
                for name, T in ((f, totals[f]) for f in src.arrays)
            })  # fmt: skip
            result = dataset_metrics([], stats, src.settings)
            for name in slow:
                values[name][r] = result.get(name, np.nan)
        out.update(values)
    for name in src.names:  # what nothing computed: undefined in every resample
        out.setdefault(name, np.full(W.shape[0], np.nan))
    return out


_RATER_POOLED = frozenset(n for n in rater_dataset_names() if n.endswith("_pooled"))


def _with_tails(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rater counts plus each image's soft-Dice tails (``raters.dice_tails``)."""
    from .raters import dice_tails

    return dict(arrays, tails=dice_tails(arrays["dice_joint"]))


def _rater_pooled(W: np.ndarray, src: Source) -> dict[str, np.ndarray]:
    """``{score}_pooled`` of each resample: the per-image soft-Dice tails and pair counts
    summed with the resample's counts (one product each), then the batched formulas."""
    from .raters import RATER_METRICS, rater_values_batch

    arrays = src.rater_arrays
    if "tails" not in arrays:  # per image (N, C, 3, 9): 27 columns a class, not 100
        arrays = _with_tails(arrays)
    n_raters, n_samples = src.rater_items
    values = rater_values_batch(
        resampled_totals(W, arrays["tails"]),
        resampled_totals(W, arrays["pair_inter"]),
        resampled_totals(W, arrays["pair_union"]),
        n_raters=n_raters, n_samples=n_samples, classes=src.settings.mean_classes,
    )  # fmt: skip
    return {f"{m}_pooled": values[m] for m in RATER_METRICS if f"{m}_pooled" in src.names}


def bootstrap(
    sources: Sequence[Source], *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> list[dict[str, np.ndarray]]:
    """Resampled data-set metrics of each source, every source with the same resamples.

    The sources must hold the same images in the same order (paired). Returns, per source,
    {metric: (n_resamples,) values}.
    """
    n = len(sources[0])
    if any(len(s) != n for s in sources):
        raise ValueError("paired sources must have the same images")
    if n == 0:
        return [{name: np.full(n_resamples, np.nan) for name in s.names} for s in sources]
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in sources]
    prepared = [_with_confusion_parts(src.arrays) for src in sources]
    sources = [  # the soft-Dice tails once per source, not once per block of resamples
        replace(src, rater_arrays=_with_tails(src.rater_arrays)) if src.rater_items else src
        for src in sources
    ]
    for W in count_blocks(n, n_resamples, seed):
        for k, src in enumerate(sources):
            parts[k].append(_samples(W, src, prepared[k]))
    return [
        {name: np.concatenate([p[name] for p in chunks]) for name in chunks[0]} for chunks in parts
    ]


def interval(samples: np.ndarray, point: float | None, level: float = LEVEL) -> list[float]:
    """Percentile interval [low, high] of ``samples``.

    Undefined (NaN) when the point estimate is: an interval around no value would suggest
    one. Resamples where the metric is undefined (say every drawn image lacks a class) are
    left out; NaN when none is defined.
    """
    if point is None or not np.isfinite(point):
        return [np.nan, np.nan]
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return [np.nan, np.nan]
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(s, [tail, 100 - tail])
    return [float(lo), float(hi)]


def dataset_intervals(
    table, summary: Mapping, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, list[float]]:
    """``dataset_ci`` of a run: {metric: [low, high]} for every data-set metric."""
    (samples,) = bootstrap([Source.from_run(table, summary)], n_resamples=n_resamples, seed=seed)
    return {name: interval(samples[name], summary["dataset"][name]) for name in samples}


def paired_delta(
    base, current, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Paired differences current − base of every data-set metric both have, with intervals.

    ``base`` and ``current`` are StatsTables over the same images in the same order
    (``align`` makes them so); point values are recomputed from them, so after ``align``
    cut them to their common images, the delta is that of those images. Returns
    ({metric: delta}, {metric: [low, high]}).
    """
    sum_a, sum_b = base.to_result().summary(), current.to_result().summary()
    src_a, src_b = Source.from_run(base, sum_a), Source.from_run(current, sum_b)
    names = [n for n in src_b.names if n in set(src_a.names)]
    src_a.names = src_b.names = names
    sa, sb = bootstrap([src_a, src_b], n_resamples=n_resamples, seed=seed)
    delta, ci = {}, {}
    for name in names:
        a, b = _number(sum_a["dataset"][name]), _number(sum_b["dataset"][name])
        delta[name] = b - a
        ci[name] = interval(sb[name] - sa[name], b - a)
    return delta, ci


def align(table_a, table_b, *, common_only: bool, what: str = "the baseline"):
    """The two tables restricted to the same images in the same order (paired by stem).

    Different image sets are an error that lists the differences, unless ``common_only``:
    then both are cut to the images they share (at least one).
    """
    a, b = set(table_a.stems), set(table_b.stems)
    if a != b:
        only_a, only_b = sorted(a - b), sorted(b - a)

        def show(stems):
            return ", ".join(stems[:5]) + (f" and {len(stems) - 5} more" if len(stems) > 5 else "")

        parts = []
        if only_a:
            parts.append(f"{len(only_a)} images only in {what} ({show(only_a)})")
        if only_b:
            parts.append(f"{len(only_b)} only in this run ({show(only_b)})")
        if not common_only:
            raise UsageError(
                "paired differences need the same images: "
                + "; ".join(parts)
                + "; evaluate the same images, or pass --common-images to compare the "
                f"{len(a & b)} images both have"
            )
        if not a & b:
            raise UsageError("no image in common with " + what + ": " + "; ".join(parts))
    common = [s for s in table_b.stems if s in a]
    return table_a.select(common), table_b.select(common)
