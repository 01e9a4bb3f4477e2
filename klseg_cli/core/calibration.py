"""Temperature scaling: the relative-entropy optimization of DESIGN §7, on class-major chunks.

For fixed maps, "make the prediction explain the target as well as possible" is the 1-D
problem  min_T F(T) = Σ_pixels KL(q ‖ softmax(log p̃ / T)).  With a = 1/T, z = a·log p̃ and
s = logsumexp(z), each pixel contributes

    NLL(a)   = s − Σ_c q_c z_c                  (KL = NLL + Σ q log q, a constant)
    NLL'(a)  = E_r[log p̃] − Σ_c q_c log p̃_c     r = softmax(z)
    NLL''(a) = Var_r[log p̃] ≥ 0

so F is convex in a, and F, F', F'' are pixel sums: each pass over the data (chunk by
chunk, float32 work, float64 sums, memory bounded by the chunk) gives them exactly at one
a. A safeguarded Newton iteration on a (a bracket [lo, hi] with F'(lo) < 0 < F'(hi) once
known, bisection when a step leaves it) finds the minimum over *all* valid pixels. It
starts from the optimum of a small sample (at most SAMPLE_PIXELS pixels in blocks spread
over the images, read first and solved in memory); the sample only decides where the
full-data steps begin, not where they end, and saves passes (typically 1–2 in all
instead of 5–6 from T = 1).

log p̃ is what DESIGN §2 scores: log max(p, eps) for probabilities, log-softmax clipped at
log eps for logits. The calibrated map is softmax(log p̃ / T).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from ..errors import KlsegError, ProbabilityError, UsageError
from .calibration_views import class_codes
from .metrics import MetricSettings, _safe_log, check_probabilities, class_dot, class_sum

VIEW_NAMES = tuple(
    f"{m}_pooled" for m in ("ece_adaptive", "ece_classwise", "ece_boundary", "ece_interior")
)
"""Dataset metrics that need ``--calibration-views`` (see calibration_views.VIEW_METRICS)."""
SAMPLE_PIXELS = 1 << 17
"""At most this many pixels (× C float32 values) are kept for the starting point."""
T_MIN, T_MAX = 1e-3, 1e3
"""The temperature is searched in [T_MIN, T_MAX]; an optimum at a bound is reported as such."""
STEP_TOL = 1e-4
"""Stop once a Newton step changes a = 1/T by less than this, relative; Newton converges
quadratically (the error after a step is about the square of the step, relative), so the
stepped value is then within ~1e-8 relative of the optimum."""


# --- per-chunk pieces ---------------------------------------------------------------------


def log_ptilde(P: np.ndarray, settings: MetricSettings, tolerance: float | None) -> np.ndarray:
    """log p̃ of a (C, n) chunk: probabilities clipped at eps, or clipped log-softmax of logits.

    With ``tolerance`` (probabilities) the chunk is validated first, with the messages of
    ``metrics.check_probabilities``. ``--renormalize`` divides by the row sums first.
    """
    log_eps = P.dtype.type(math.log(settings.eps))
    if settings.input_kind == "logits":
        if not np.isfinite(P).all():
            bad = int(np.count_nonzero(~np.isfinite(P)))
            raise ProbabilityError(f"{bad} logits are NaN or infinite")
        shifted = P - P.max(axis=0)
        total = class_sum(np.exp(shifted))
        shifted -= np.log(total)
        return np.maximum(shifted, log_eps, out=shifted)
    if settings.renormalize:
        sums = class_sum(P)
        if not (np.isfinite(P).all() and (P >= 0).all() and (sums > 0).all()):
            check_probabilities(P, sums, tolerance=tolerance or 1e-3)
            raise ProbabilityError("pixels with all-zero probabilities; cannot renormalize")
        P = P / sums
    elif tolerance is not None and P.size:
        sums = class_sum(P)
        lo, hi = float(P.min()), float(P.max())
        worst = float(np.abs(sums - 1.0).max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or worst > tolerance:
            check_probabilities(P, sums, tolerance=tolerance)  # the diagnosis; raises
    return np.maximum(_safe_log(P), log_eps)


def target_terms(
    L: np.ndarray, target: np.ndarray, settings: MetricSettings
) -> tuple[np.ndarray, float]:
    """(Σ_c q_c log p̃_c per pixel, Σ_pixels Σ_c q_c log q_c) for hard labels or soft targets."""
    C, n = L.shape
    if settings.soft_gt:
        Q = target
        return class_dot(Q, L), float(np.sum(class_dot(Q, _safe_log(Q)), dtype=np.float64))
    L_y = L.reshape(-1).take(target * n + np.arange(n))
    q_lo, q_hi = settings.q_lo, settings.q_hi
    if q_lo == 0.0:
        return L_y, 0.0
    qL = q_lo * class_sum(L) + (q_hi - q_lo) * L_y
    neg_h = q_hi * math.log(q_hi) + (C - 1) * q_lo * math.log(q_lo)
    return qL, n * neg_h


def chunk_objective(L: np.ndarray, qL: np.ndarray, a: float) -> tuple[float, float, float]:
    """(Σ NLL, Σ dNLL/da, Σ d²NLL/da²) of a chunk at a = 1/T, as float64 sums.

    log p̃ ≤ 0 and its largest value per pixel is at least −log C, so Σ_c exp(a·log p̃_c)
    lies in [C^−a, C]: no max needs subtracting unless a·log C is large.
    """
    C, n = L.shape
    if n == 0:
        return 0.0, 0.0, 0.0
    dt = L.dtype.type
    Z = L * dt(a)
    shift = None
    if a * (math.log(C) + 1.0) > 60.0:
        shift = Z.max(axis=0)
        Z -= shift
    E = np.exp(Z, out=Z)
    S = class_sum(E)
    E *= L
    S1 = class_sum(E)
    E *= L
    S2 = class_sum(E)
    mean = S1 / S
    var = S2 / S
    var -= mean * mean
    np.maximum(var, 0.0, out=var)
    s = np.log(S)
    if shift is not None:
        s += shift
    s -= dt(a) * qL
    mean -= qL
    return (
        float(np.sum(s, dtype=np.float64)),
        float(np.sum(mean, dtype=np.float64)),
        float(np.sum(var, dtype=np.float64)),
    )


def scaled_chunk(
    P: np.ndarray,
    settings: MetricSettings,
    stored_dtype,
    tolerance: float | None,
    *,
    two_d: bool = False,
) -> tuple[np.ndarray, MetricSettings]:
    """A chunk with the temperature applied, as the calibrated map would be stored and read.

    Returns ``(P', settings')``: for probabilities P' = softmax(log p̃ / T), for logits the
    logits log p̃ / T (whose softmax is that); rounded to ``stored_dtype``, and for a 2-D
    (binary) map (``two_d``) rebuilt from class 1's stored value as the reader does, so that
    numbers computed on the fly equal those of the maps ``klseg calibrate --write`` stores.
    ``settings'`` has no temperature and no renormalization: evaluate P' with it.
    """
    L = log_ptilde(P, settings, tolerance)
    L *= L.dtype.type(1.0 / settings.temperature)
    inner = replace(settings, temperature=1.0, renormalize=False)
    logits = settings.input_kind == "logits"
    if logits:
        out = L
    else:
        L -= L.max(axis=0)
        out = np.exp(L, out=L)
        out /= class_sum(out)
    if two_d:  # stored: P(class 1), or the logit of class 1 against class 0
        v = (out[1] - out[0]) if logits else out[1]
        v = v.astype(stored_dtype).astype(out.dtype)
        pair = np.empty_like(out)
        if logits:
            pair[0] = 0.0
        else:
            np.subtract(1.0, v, out=pair[0])
        pair[1] = v
        return pair, inner
    if np.dtype(stored_dtype) != out.dtype:
        out = out.astype(stored_dtype).astype(out.dtype)
    return out, inner


# --- the search ---------------------------------------------------------------------------


@dataclass
class PassResult:
    """One pass over the data at one temperature: the objective and its derivatives."""

    temperature: float
    kl_mean: float  # F(T) / N: the mean KL(q‖p_T) per valid pixel, nats
    grad_a: float  # dF/da / N
    curv_a: float  # d²F/da² / N

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "kl_mean": self.kl_mean,
                "dkl_dT": -self.grad_a / self.temperature**2}  # fmt: skip


@dataclass
class TemperatureFit:
    temperature: float
    n_valid: int
    passes: list[PassResult] = field(default_factory=list)
    at_bound: bool = False  # the optimum lies at T_MIN or T_MAX (T → 0 or ∞)

    @property
    def n_passes(self) -> int:
        return len(self.passes)


Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray, float]]]
"""A fresh iterator, each call, over every chunk's (log p̃ (C, n), Σq log p̃ (n,), Σq log q)."""
SAMPLE_BLOCK = 2048
"""Pixels per block read for the starting point (one Cityscapes row)."""


class FitData(Protocol):
    """What ``fit_temperature`` needs from a data set."""

    def pass_at(self, a: float) -> tuple[int, float, float, float, float]:
        """One pass over every valid pixel at a = 1/T: (N, Σq log q, ΣNLL, ΣNLL', ΣNLL'')."""

    def sample(self) -> Callable[[float], tuple[float, float]] | None:
        """(ΣNLL', ΣNLL'') at a over a few spread-out pixels held in memory (at most about
        SAMPLE_PIXELS), or None: what the starting point is found on."""


@dataclass
class ChunkData:
    """``FitData`` over arrays: ``chunks()`` yields (log p̃, Σq log p̃, Σq log q) triples."""

    chunks: Chunks
    n_pixels_hint: int = SAMPLE_PIXELS

    def pass_at(self, a: float):
        n = 0
        neg_h = f = g = h = 0.0
        for L, qL, nh in self.chunks():
            n += L.shape[1]
            neg_h += nh
            df, dg, dh = chunk_objective(L, qL, a)
            f, g, h = f + df, g + dg, h + dh
        return n, neg_h, f, g, h

    def sample(self):
        stride = max(1, -(-self.n_pixels_hint // SAMPLE_PIXELS))
        out = []
        for L, qL, _ in self.chunks():
            out.append((L[:, ::stride].copy(), qL[::stride].copy()))
        return _numpy_sample(out)


def _numpy_sample(parts: list) -> Callable[[float], tuple[float, float]] | None:
    """The sample evaluator over (log p̃, Σq log p̃) pieces."""
    parts = [p for p in parts if p[1].size]
    if not parts:
        return None
    Ls = np.concatenate([p[0] for p in parts], axis=1)
    qs = np.concatenate([p[1] for p in parts])

    def evaluate(a: float) -> tuple[float, float]:
        _, g, h = chunk_objective(Ls, qs, a)
        return g, h

    return evaluate


def _newton(evaluate: Callable[[float], tuple[float, float]], a: float, lo, hi, *,
            tol: float, max_steps: int) -> tuple[float, bool]:  # fmt: skip
    """Safeguarded Newton on a convex function of a: ``evaluate(a) -> (F', F'')``.

    ``lo``/``hi`` bracket the root of F' where known (None: open). Returns (a, at_bound).
    """
    a_min, a_max = 1.0 / T_MAX, 1.0 / T_MIN
    for _ in range(max_steps):
        g, h = evaluate(a)
        if g == 0.0:
            return a, False
        if g < 0:
            lo = a
        else:
            hi = a
        step = -g / h if h > 0 else math.inf * -math.copysign(1.0, g)
        new = a + step
        left = lo if lo is not None else a / 4.0
        right = hi if hi is not None else a * 4.0
        if not (left < new < right):
            new = 0.5 * (left + right) if lo is not None and hi is not None else (
                right if g < 0 else left)  # fmt: skip
        new = min(max(new, a_min), a_max)
        if new == a:  # pinned at a bound
            return a, True
        if abs(new - a) <= tol * a:
            return new, False
        a = new
    return a, False


def _sample_optimum(evaluate: Callable[[float], tuple[float, float]]) -> float:
    """a = 1/T minimising the objective on the sample (in memory; only a starting point, so
    1e-6 is precise enough: the sample's own noise is larger)."""
    return _newton(evaluate, 1.0, None, None, tol=1e-6, max_steps=60)[0]


def fit_temperature(
    data: FitData,
    *,
    max_passes: int = 30,
    on_pass: Callable[[PassResult], None] | None = None,
) -> TemperatureFit:
    """The T > 0 minimising Σ KL(q‖softmax(log p̃ / T)) over every valid pixel of ``data``.

    ``data`` is a ``PairData`` (files) or a ``ChunkData`` (arrays); ``on_pass`` hears
    about each pass over the data. The starting point is the optimum of a small sample
    (read first, in memory); the passes then make it exact for every pixel.
    """
    fit = TemperatureFit(temperature=1.0, n_valid=0)
    sample = data.sample()
    a0 = _sample_optimum(sample) if sample is not None else 1.0
    del sample
    if not (math.isfinite(a0) and a0 > 0):
        a0 = 1.0
    a0 = min(max(a0, 1.0 / T_MAX), 1.0 / T_MIN)

    def full_eval(a):
        if len(fit.passes) >= max_passes:
            raise UsageError(f"the temperature did not converge in {max_passes} passes")
        n, neg_h, f, g, h = data.pass_at(a)
        if n == 0:
            raise UsageError("no valid pixels to fit a temperature on")
        if fit.n_valid and n != fit.n_valid:
            raise UsageError("the data changed between passes")
        fit.n_valid = n
        r = PassResult(1.0 / a, (f + neg_h) / n, g / n, h / n)
        fit.passes.append(r)
        if on_pass is not None:
            on_pass(r)
        return g, h

    a, at_bound = _newton(full_eval, a0, None, None, tol=STEP_TOL, max_steps=max_passes)
    fit.temperature = 1.0 / a
    fit.at_bound = at_bound
    return fit


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(fit part, holdout part): a seeded random split by image, order kept within each.

    The holdout gets round(fraction · n) images, at least one and leaving one to fit on.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--holdout must be between 0 and 1, got {fraction}")
    n = len(items)
    k = min(max(1, round(fraction * n)), n - 1)
    if n < 2:
        raise UsageError("--holdout needs at least 2 images")
    chosen = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    fit = [x for i, x in enumerate(items) if i not in chosen]
    hold = [x for i, x in enumerate(items) if i in chosen]
    return fit, hold


def iter_fit_chunks(pairs, settings: MetricSettings, read) -> Iterator:
    """(log p̃, Σq log p̃, Σq log q) of every chunk of every pair's valid pixels: one pass."""
    for pair in pairs:
        opened = _open(pair, settings, read)
        yield from _numpy_chunks(pair, opened, settings, read)


def _open(pair, settings: MetricSettings, read):
    from ..engine.local import open_pair

    opened = open_pair(pair, soft_gt=settings.soft_gt, num_classes=settings.num_classes,
                       read=read)  # fmt: skip
    if opened.target is None:
        raise UsageError(f"{pair.pred}: calibration needs a target")
    return opened


def _numpy_chunks(pair, opened, settings: MetricSettings, read) -> Iterator:
    from ..engine.local import _tolerance, iter_chunks

    tolerance = _tolerance(opened.pred, settings)
    for _, _, _, P, tgt in iter_chunks(
        opened.pred, opened.target, settings, chunk_pixels=read.chunk_pixels,
        target_path=pair.target,
    ):  # fmt: skip
        try:
            L = log_ptilde(P, settings, tolerance)
        except KlsegError as err:
            raise err.with_path(pair.pred) from None
        qL, neg_h = target_terms(L, tgt, settings)
        yield L, qL, neg_h


@dataclass
class PairData:
    """``FitData`` over the files of ``pairs``: the compiled pass (``_fast_fit``) for the
    maps the evaluation kernel would take, the NumPy pass for the rest."""

    pairs: list
    settings: MetricSettings
    read: object  # evaluation.ReadOptions
    n_pixels: int = 0  # of all predictions, from their headers: spreads the sample

    def pass_at(self, a: float):
        from ..engine.local import uses_kernel

        n = 0
        neg_h = f = g = h = 0.0
        for pair in self.pairs:
            opened = _open(pair, self.settings, self.read)
            if _labels(opened.target) and uses_kernel(
                opened.pred, self.settings, self.read.accelerate
            ):
                r = _kernel_pass(pair, opened, self.settings, self.read, a)
            else:
                chunks = _numpy_chunks(pair, opened, self.settings, self.read)
                r = ChunkData(lambda chunks=chunks: chunks).pass_at(a)
            n += r[0]
            neg_h, f, g, h = neg_h + r[1], f + r[2], g + r[3], h + r[4]
        return n, neg_h, f, g, h

    def sample(self):
        """Pixels spread evenly over the images (or over every k-th image when there are
        many), read in blocks: whole small images are read in order and thinned. Values are
        not checked here — the passes check every one."""
        from ..engine.local import chunk_for
        from . import _fast_fit

        settings, read = self.settings, self.read
        budget = max(SAMPLE_BLOCK, min(SAMPLE_PIXELS, (1 << 22) // settings.num_classes))
        total = max(self.n_pixels, 1)
        block = max(256, min(SAMPLE_BLOCK, budget // max(len(self.pairs), 1)))
        every = max(1, -(-len(self.pairs) * block // budget))
        raw, parts, kernel = [], [], True
        logits = settings.input_kind == "logits"
        for pair in self.pairs[::every]:
            try:
                opened = _open(pair, settings, read)
            except KlsegError:  # the passes report it
                continue
            pred, target = opened.pred, opened.target
            kernel = kernel and _labels(target) and _fast_fit.supported(
                settings, pred.compute_dtype)  # fmt: skip
            npx = pred.n_pixels
            want = max(1, round(budget * npx / total * every))
            if want * 4 >= npx:  # a small image: read it in order, keep every k-th pixel
                step = chunk_for(read.chunk_pixels, pred.num_classes)
                starts, thin = range(0, npx, step), max(1, npx // want)
            else:
                step = chunk_for(block, pred.num_classes)
                k = max(1, want // step)
                starts, thin = np.linspace(0, npx - step, k).astype(np.int64).tolist(), 1
            for start in starts:
                stop = min(start + step, npx)
                with np.errstate(all="ignore"):
                    P = pred.block(start, stop, logits=logits)[:, ::thin]
                    if _labels(target):
                        y = class_codes(target.reshape(-1)[start:stop][::thin], settings)
                        keep = y >= 0
                        P, tgt = P[:, keep], y[keep]
                    else:
                        tgt = target.block(start, stop)[:, ::thin]
                    raw.append((np.ascontiguousarray(P, dtype=np.float32), tgt))
        if not raw:
            return None
        if kernel:  # the compiled pass on the sample's probabilities and labels
            Ps = np.concatenate([r[0] for r in raw], axis=1)
            ys = np.concatenate([r[1] for r in raw])

            def evaluate(a: float) -> tuple[float, float]:
                ok, _, _, g, h = _fast_fit.chunk_sums(Ps, ys, a, settings, 1e30)
                return (g, h) if ok else (math.nan, math.nan)

            return evaluate
        for P, tgt in raw:
            with np.errstate(all="ignore"):
                L = log_ptilde(P, settings, None)
                qL, _ = target_terms(L, tgt, settings)
            ok = np.isfinite(qL)
            parts.append((L[:, ok], qL[ok]))
        return _numpy_sample(parts)


def _labels(target) -> bool:
    """Whether a target is a label mask (an array, or one read in row bands), not a soft
    target map (which is read with ``block``)."""
    return target is not None and not hasattr(target, "block")


def _kernel_pass(pair, opened, settings, read, a):
    """One pair through the compiled pass; a chunk it refuses goes through NumPy (which
    raises the error, or computes it when the bad values are all under ignored pixels)."""
    from ..engine.local import _tolerance, chunk_for
    from . import _fast_fit

    pred = opened.pred
    labels = opened.target.reshape(-1)
    settings.labels.check(labels, pair.target)
    tolerance = _tolerance(pred, settings)
    step = chunk_for(read.chunk_pixels, pred.num_classes)
    planes = pred.planes_in_memory()
    pixel_major = pred.layout == "hwc"
    n = 0
    f = g = h = 0.0
    for start in range(0, pred.n_pixels, step):
        stop = min(start + step, pred.n_pixels)
        y = class_codes(labels[start:stop], settings)
        if planes is not None:
            ok, k, df, dg, dh = _fast_fit.chunk_sums(planes, y, a, settings, tolerance,
                                                     start=start)  # fmt: skip
            P = planes[:, start:stop]
        else:
            P = pred.pixel_rows(start, stop) if pixel_major else pred.block(start, stop)
            ok, k, df, dg, dh = _fast_fit.chunk_sums(P, y, a, settings, tolerance,
                                                     pixel_major=pixel_major)  # fmt: skip
            if pixel_major:
                P = P.T
        if not ok:  # the NumPy path diagnoses the chunk (or computes it)
            idx = np.flatnonzero(y >= 0)
            try:
                L = log_ptilde(np.ascontiguousarray(P[:, idx]), settings, tolerance)
            except KlsegError as err:
                raise err.with_path(pair.pred) from None
            qL, _ = target_terms(L, y[idx], settings)
            k = idx.size
            df, dg, dh = chunk_objective(L, qL, a)
        n += k
        f, g, h = f + df, g + dg, h + dh
    return n, 0.0, f, g, h
