"""``klseg compare A B [GT]``: two models' predictions of the same images (DESIGN §8).

Pairs A's and B's maps by stem, then per image, chunk by chunk (the readers and checks of
``evaluate``): KL(A‖B), KL(B‖A), JS(A, B) and the argmax agreement (``agreement.py``).
With targets it also evaluates each model against them (``evaluation.evaluate_pair``), so
both models' metrics stand side by side with their paired differences B − A, and the
bootstrap (``bootstrap.py``) resamples images once for both. Ignored target pixels count
nowhere, in the agreement too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.agreement import (
    IMAGE_METRICS,
    PairStats,
    pair_class_rows,
    pair_metrics,
    pair_metrics_batch,
    pair_terms,
)
from ..core.chunks import chunk_for
from ..core.metrics import MetricSettings, prediction_terms
from ..core.results import EvaluationResult, ImageResult, ReadOptions
from ..core.stats import IMAGE_MEAN_METRICS
from ..engine.image import evaluate_pair
from ..engine.local import plan, pooled_results
from ..errors import InputError, KlsegError, ShapeError, UsageError
from ..io.pairing import Pair, _index
from ..io.readers import (
    PRED_SUFFIXES,
    PredictionMap,
    open_prediction,
    read_target,
    sum_tolerance,
)

RANK_BY = ("kl", "miou")


@dataclass(frozen=True)
class ComparePair:
    stem: str
    a: Path
    b: Path
    target: Path | None


@dataclass
class CompareImage:
    """One image: A against B, and with a target each model against it."""

    stem: str
    height: int
    width: int
    pair: PairStats
    a: ImageResult | None = None
    b: ImageResult | None = None
    files: tuple[Path, ...] = ()  # the maps (and target) read


@dataclass
class CompareResult:
    settings: MetricSettings
    images: list[CompareImage]
    a: Path
    b: Path
    target: Path | None
    only_in_a: list[Path] = field(default_factory=list)  # left out (--allow-missing)
    only_in_b: list[Path] = field(default_factory=list)  # warned about
    missing_predictions: list[Path] = field(default_factory=list)

    @property
    def with_target(self) -> bool:
        return self.target is not None

    def model_result(self, which: str) -> EvaluationResult:
        """Model A's or B's evaluation against the targets, as ``evaluate`` would give it."""
        return EvaluationResult(
            settings=self.settings, images=[getattr(img, which) for img in self.sorted()]
        )

    def sorted(self) -> list[CompareImage]:
        return sorted(self.images, key=lambda i: i.stem)

    def image_rows(self) -> list[dict]:
        """compare.csv's rows: agreement metrics, and with targets a_*, b_*, delta_*."""
        rows = []
        model_rows = {}
        if self.with_target:
            for which in ("a", "b"):
                model_rows[which] = {r["image"]: r for r in self.model_result(which).image_rows()}
        for img in self.sorted():
            row = {"image": img.stem, "height": img.height, "width": img.width,
                   "n_valid": img.pair.n_valid}  # fmt: skip
            row.update(pair_metrics(img.pair, self.settings))
            if self.with_target:
                ra, rb = model_rows["a"][img.stem], model_rows["b"][img.stem]
                for m in IMAGE_MEAN_METRICS:
                    row[f"a_{m}"], row[f"b_{m}"] = ra[m], rb[m]
                for m in IMAGE_MEAN_METRICS:
                    row[f"delta_{m}"] = rb[m] - ra[m]
            rows.append(row)
        return rows

    def summary(
        self, *, n_resamples: int = 0, seed: int = 0, top_k: int = 5, rank_by: str = "kl"
    ) -> dict:
        """compare.json: agreement per data set, class and image; with targets both
        models' metrics, their differences (and intervals) and the images B does worst on."""
        from ..core.bootstrap import Source, bootstrap, interval, paired_delta
        from ..io.statsfile import StatsTable, stack_stats

        if rank_by not in RANK_BY:
            raise UsageError(f"--rank-by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
        images = self.sorted()
        total = PairStats.zeros(self.settings.num_classes)
        for img in images:
            total = total + img.pair
        rows = self.image_rows()
        pooled = pair_metrics(total, self.settings)
        dataset = {}
        for m in IMAGE_METRICS:
            dataset[f"{m}_pooled"] = pooled[m]
            defined = [r[m] for r in rows if not math.isnan(r[m])]
            dataset[f"{m}_image_mean"] = float(np.mean(defined)) if defined else math.nan
        out: dict = {
            "klseg_version": __version__,
            "settings": self.settings.as_dict(),
            "a": str(self.a),
            "b": str(self.b),
            "target": None if self.target is None else str(self.target),
            "n_images": len(images),
            "n_valid": total.n_valid,
            "n_clipped_ab": total.n_clipped_ab,
            "n_clipped_ba": total.n_clipped_ba,
            "dataset": dataset,
            "classes": pair_class_rows(total, self.settings),
            "images": rows,
        }
        if n_resamples and images:
            arrays = {
                "sums": np.stack([i.pair.sums for i in images]),
                "confusion": np.stack([i.pair.confusion for i in images]),
            }
            values = {m: np.array([r[m] for r in rows], dtype=np.float64) for m in IMAGE_METRICS}
            src = Source(arrays, values, self.settings, list(dataset), batch=pair_metrics_batch)
            (samples,) = bootstrap([src], n_resamples=n_resamples, seed=seed)
            out["bootstrap"] = {"resamples": n_resamples, "seed": seed, "level": 0.95,
                                "paired_by": "image stem"}  # fmt: skip
            out["dataset_ci"] = {k: interval(samples[k], dataset[k]) for k in dataset}
        if self.with_target:
            models = {w: self.model_result(w).summary() for w in ("a", "b")}
            out["models"] = {w: s["dataset"] for w, s in models.items()}
            out["model_classes"] = {w: s["classes"] for w, s in models.items()}
            out["delta"] = {
                k: out["models"]["b"][k] - out["models"]["a"][k] for k in out["models"]["b"]
            }
            if n_resamples and images:
                tables = []
                for w in ("a", "b"):
                    res = self.model_result(w)
                    s = self.settings
                    tables.append(StatsTable(
                        stems=[i.stem for i in images],
                        height=np.array([i.height for i in images], dtype=np.int64),
                        width=np.array([i.width for i in images], dtype=np.int64),
                        settings=s.as_dict(),
                        arrays=stack_stats([i.stats for i in res.images],
                                           _zeros_stats(s)),
                    ))  # fmt: skip
                _, out["delta_ci"] = paired_delta(*tables, n_resamples=n_resamples, seed=seed)
            out["rank_by"] = rank_by
            out["worst"] = worst_images(rows, top_k, rank_by)
        out["requirements"] = []
        out["only_in_a"] = [str(p) for p in self.only_in_a]
        out["only_in_b"] = [str(p) for p in self.only_in_b]
        out["missing_predictions"] = [str(p) for p in self.missing_predictions]
        return out


def _zeros_stats(settings: MetricSettings):
    from ..core.stats import Stats

    return Stats.zeros(settings.num_classes, settings.ece_bins, n_scores=len(settings.uncertainty))


def worst_images(rows: Sequence[Mapping], k: int, rank_by: str) -> list[dict]:
    """The ``k`` images where B is most worse than A: largest Δkl (B − A), or most negative
    Δmiou. Images whose difference is undefined are left out."""
    key = "delta_kl" if rank_by == "kl" else "delta_miou"
    sign = 1.0 if rank_by == "kl" else -1.0
    ranked = sorted(
        (r for r in rows if not math.isnan(r[key])), key=lambda r: sign * r[key], reverse=True
    )[: max(k, 0)]
    return [{"image": r["image"], "delta_kl": r["delta_kl"], "delta_miou": r["delta_miou"],
             "a_miou": r["a_miou"], "b_miou": r["b_miou"]} for r in ranked]  # fmt: skip


# --- per image ------------------------------------------------------------------------------


def open_two(
    path_a: Path,
    path_b: Path,
    hw: tuple[int, int] | None,
    settings: MetricSettings,
    read: ReadOptions,
) -> tuple[PredictionMap, PredictionMap]:
    """Open A's and B's maps of one image and check that they fit each other."""
    kw = dict(layout=read.layout, num_classes=settings.num_classes, npz_key=read.npz_key,
              max_pixels=read.max_pixels)  # fmt: skip
    pa = open_prediction(path_a, hw=hw, **kw)
    try:
        pb = open_prediction(path_b, hw=(pa.height, pa.width), **kw)
    except ShapeError as err:
        if hw is not None:
            raise
        raise ShapeError(
            f"{err.message} (with no target, the (H, W) of A's map {Path(path_a).name})",
            path=err.path,
        ) from None
    for pm in (pa, pb):
        if pm.num_classes != settings.num_classes:
            raise ShapeError(
                f"has {pm.num_classes} classes ({pm.layout.upper()} shape "
                f"{tuple(pm.array.shape)}), expected {settings.num_classes}",
                path=pm.path,
            )
    return pa, pb


def _terms(P: np.ndarray, pm: PredictionMap, settings: MetricSettings):
    tol = None if settings.input_kind == "logits" else sum_tolerance(pm.array.dtype)
    try:
        return prediction_terms(P, settings, tolerance=tol)
    except KlsegError as err:
        raise err.with_path(pm.path) from None


def iter_pair_chunks(
    pa: PredictionMap,
    pb: PredictionMap,
    settings: MetricSettings,
    *,
    labels: np.ndarray | None = None,
    chunk_pixels: int,
):
    """``(start, stop, valid, PairTerms)`` chunk by chunk; ``labels`` (flat) masks ignored
    pixels (``valid`` is None when every pixel of the chunk counts)."""
    logits = settings.input_kind == "logits"
    C = settings.num_classes
    chunk = chunk_for(chunk_pixels, C)
    for start in range(0, pa.n_pixels, chunk):
        stop = min(start + chunk, pa.n_pixels)
        A = pa.block(start, stop, logits=logits)
        B = pb.block(start, stop, logits=logits)
        valid = None
        if labels is not None:
            mask = settings.labels.codes(labels[start:stop]) >= 0  # mapped, ignore applied
            if not mask.all():
                valid, A, B = mask, A.compress(mask, axis=1), B.compress(mask, axis=1)
        yield start, stop, valid, pair_terms(_terms(A, pa, settings), _terms(B, pb, settings),
                                             settings)  # fmt: skip


def compare_pair(pair: ComparePair, settings: MetricSettings, read: ReadOptions) -> CompareImage:
    """A against B (and each against the target, when there is one) for one image."""
    a_res = b_res = None
    labels = None
    hw = None
    if pair.target is not None:
        a_res = evaluate_pair(Pair(pair.stem, pair.a, pair.target), settings, read=read)
        b_res = evaluate_pair(Pair(pair.stem, pair.b, pair.target), settings, read=read)
        hw = (a_res.height, a_res.width)
        if not settings.soft_gt:
            labels = read_target(pair.target, max_pixels=read.max_pixels).reshape(-1)
    pa, pb = open_two(pair.a, pair.b, hw, settings, read)
    total = PairStats.zeros(settings.num_classes)
    for _, _, _, terms in iter_pair_chunks(
        pa, pb, settings, labels=labels, chunk_pixels=read.chunk_pixels
    ):
        total = total + PairStats.from_terms(terms, settings.num_classes)
    files = tuple(p for p in (pair.a, pair.b, pair.target) if p is not None)
    return CompareImage(pair.stem, pa.height, pa.width, total, a_res, b_res, files)


def _compare_one(pair: ComparePair, settings: MetricSettings, read: ReadOptions):
    """In a worker: the image's result, or the InputError it raised (re-raised in order)."""
    try:
        return compare_pair(pair, settings, read)
    except InputError as err:
        return err


# --- pairing and the whole run --------------------------------------------------------------


def pair_models(
    a: Path,
    b: Path,
    target: Path | None,
    *,
    pred_suffix: str = "",
    allow_missing: bool = False,
    **plan_options,
):
    """(pairs, settings, read options, only in A, only in B, targets without prediction).

    A pairs with its targets exactly as in ``evaluate`` (``plan``); B's maps pair with A's
    by stem. A map of A without one of B is an error unless ``allow_missing`` (then it is
    left out and listed); a map of B without one of A is listed as a warning.
    """
    a, b = Path(a), Path(b)
    job = plan(a, target, pred_suffix=pred_suffix, allow_missing=allow_missing, **plan_options)
    if not b.exists():
        raise InputError("no such file or folder", path=b)
    if a.is_file() != b.is_file():
        raise UsageError(f"{a} and {b} must be two files or two folders")
    if b.is_file():
        b_files = {job.pairing.pairs[0].stem: b}
    else:
        b_files = _index(b, PRED_SUFFIXES, pred_suffix, "prediction")
    stems = {p.stem for p in job.pairing.pairs}
    pairs = [
        ComparePair(p.stem, p.pred, b_files[p.stem], p.target)
        for p in job.pairing.pairs
        if p.stem in b_files
    ]
    only_a = [p.pred for p in job.pairing.pairs if p.stem not in b_files]
    only_b = [path for s, path in sorted(b_files.items()) if s not in stems]
    if only_a and not allow_missing:
        shown = ", ".join(p.name for p in only_a[:5])
        more = f" and {len(only_a) - 5} more" if len(only_a) > 5 else ""
        raise InputError(
            f"{len(only_a)} maps of A have no map of B with the same stem ({shown}{more}); "
            "pass --allow-missing to compare the rest",
            path=b,
        )
    if not pairs:
        raise InputError(f"no map in {b} has the stem of a map in {a}", path=b)
    return pairs, job.settings, job.read, only_a, only_b, job.pairing.missing_pred


def compare_models(
    a: str | Path,
    b: str | Path,
    target: str | Path | None = None,
    *,
    jobs: int = 1,
    on_start: Callable[[int], None] | None = None,
    on_image: Callable[[ComparePair], None] | None = None,
    **options,
) -> CompareResult:
    """Compare two models' maps of the same images (files or folders), optionally with
    targets. ``options`` are those of ``evaluation.plan`` (the suffix applies to A and B).

    Example (in a notebook)::

        import klseg_cli
        res = klseg_cli.compare_models("preds_a/", "preds_b/", "labels/")
        res.summary(n_resamples=1000)["delta"]["miou_image_mean"]
    """
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    pairs, settings, read, only_a, only_b, missing = pair_models(
        Path(a), Path(b), Path(target) if target is not None else None, **options
    )
    if on_start is not None:
        on_start(len(pairs))
    images = []
    for pair, outcome in _map(pairs, settings, read, jobs):
        if isinstance(outcome, InputError):
            raise outcome
        images.append(outcome)
        if on_image is not None:
            on_image(pair)
    return CompareResult(settings, images, Path(a), Path(b),
                         Path(target) if target is not None else None, only_a, only_b,
                         missing)  # fmt: skip


def _map(pairs: list[ComparePair], settings: MetricSettings, read: ReadOptions, jobs: int):
    """(pair, result or InputError) in pair order, in ``jobs`` processes when > 1.

    Processes, not threads: the per-chunk work is many short NumPy calls that would queue
    on the GIL (see ``evaluation.parallel_backend``). Order and results do not depend on
    ``jobs``.
    """
    if jobs <= 1 or len(pairs) < 2:
        for pair in pairs:
            yield pair, _compare_one(pair, settings, read)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(pairs)), mp_context=ctx)
    yield from pooled_results(pool, _compare_one, pairs, settings, read)


def compare_names() -> list[str]:
    """The names ``--require`` knows in compare (``dataset`` of compare.json)."""
    return [f"{m}_{kind}" for m in IMAGE_METRICS for kind in ("pooled", "image_mean")]


def check_compare_names(texts: Sequence[str], *, with_target: bool) -> None:
    """Fail fast on requirement names compare cannot check (before any map is read)."""
    from .requirements import dataset_keys, lookup, parse_requirement

    template = {"dataset": dict.fromkeys(compare_names(), math.nan), "classes": [],
                "per_class": False}  # fmt: skip
    for text in texts:
        req = parse_requirement(text)
        if req.klass is not None:
            raise UsageError(
                f"--require {text!r}: compare checks data-set names only "
                f"({', '.join(compare_names())}) and delta(NAME)"
            )
        if req.baseline:
            raise UsageError(f"--require {text!r}: compare has no baseline; use delta(NAME)")
        if req.bound == "delta":
            if not with_target:
                raise UsageError(f"--require {text!r}: delta() compares the models' metrics "
                                 "against targets: give GT")  # fmt: skip
            if req.metric not in dataset_keys():
                raise UsageError(
                    f"--require {text!r}: unknown name {req.metric!r}; delta() takes one of "
                    + ", ".join(dataset_keys())
                )
        else:
            from dataclasses import replace

            lookup(template, replace(req, bound=None))
