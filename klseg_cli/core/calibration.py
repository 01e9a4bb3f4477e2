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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from ..errors import ProbabilityError, UsageError
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
