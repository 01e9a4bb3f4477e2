"""Per-pixel quantities of DESIGN §2, computed on one chunk of pixels.

Everything here works on a *class-major* chunk: an array ``P`` of shape (C, n) holding the
prediction for n valid pixels (probabilities, or logits with ``input_kind="logits"``), and
a target that is either hard labels ``y`` of shape (n,) or a soft target ``Q`` of shape
(C, n). Class-major keeps every operation a plain vectorised pass over contiguous class
planes; the readers turn HWC blocks into this form one cache-sized chunk at a time.

The arithmetic stays in the chunk's dtype (float32, or float64 for float64 input); only the
sums that leave a chunk are float64 (see ``stats.py``). Hard labels are never expanded to a
one-hot array: with label smoothing the target is q = q_lo everywhere except q_hi at the
label, so every sum over classes splits into "all classes at q_lo" plus a correction at y.
All values are in nats; the log base is applied once, when results are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..defaults import DEFAULT_EPS
from ..errors import ProbabilityError, UsageError
from .boundary import BoundaryOptions
from .labels import LabelMap, LabelSpec, default_ignore_index

PIXEL_METRICS = ("kl", "kl_reverse", "js", "ce", "entropy", "brier")
"""Per-pixel quantities that are summed and reported as means (in this order)."""

DEFAULT_ECE_BINS = 15


@dataclass(frozen=True)
class MetricSettings:
    """Every option that changes a number. Recorded in ``summary.json``."""

    num_classes: int
    eps: float = DEFAULT_EPS
    smoothing: float = 0.0
    ignore_index: tuple[int, ...] | None = None  # None: 255 unless it is a class
    input_kind: str = "probs"
    log_base: float = math.e
    soft_gt: bool = False
    ece_bins: int = DEFAULT_ECE_BINS
    class_names: tuple[str, ...] = field(default=())
    renormalize: bool = False
    label_map: LabelMap | None = None
    reduce_zero_label: bool = False
    exclude_classes: tuple[int, ...] = ()  # left out of the class means (--exclude-class)
    temperature: float = 1.0  # p ↦ softmax(log p̃ / T) before anything else (DESIGN §7)
    calibration_views: bool = False  # adaptive, class-wise, boundary/interior ECE sums
    boundary_band: int = 3  # pixels within this distance of another class are "boundary"
    boundary: BoundaryOptions | None = None  # --boundary: HD95, ASSD, NSD, Boundary IoU
    uncertainty: tuple[str, ...] = ()  # --uncertainty: failure-detection scores (DESIGN §11)
    qc_threshold: float = 0.5  # --qc-threshold: images with mIoU below it are "failed"
    labels: LabelSpec = field(init=False, compare=False, repr=False)  # raw label → class

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise UsageError(f"need at least 2 classes, got {self.num_classes}")
        if not 0.0 < self.eps < 1.0:
            raise UsageError(f"--eps must be in (0, 1), got {self.eps}")
        if not 0.0 <= self.smoothing < 1.0:
            raise UsageError(f"--smoothing must be in [0, 1), got {self.smoothing}")
        if self.input_kind not in ("probs", "logits"):
            raise UsageError(f"--input must be 'probs' or 'logits', got {self.input_kind!r}")
        if not (math.isfinite(self.log_base) and self.log_base > 1):  # 0.5: KL < 0; inf: 0
            raise UsageError(
                f"--log-base must be a finite number above 1 (e, 2, 10), got {self.log_base}"
            )
        if self.ignore_index is None:  # 255, unless it is a class (labels.default_ignore_index)
            default = default_ignore_index(
                self.num_classes, reduce_zero_label=self.reduce_zero_label
            )
            object.__setattr__(self, "ignore_index", default)
        if any(not -(2**63) <= int(i) < 2**63 for i in self.ignore_index):
            raise UsageError(f"--ignore-index values must fit in 64 bits, got {self.ignore_index}")
        if self.ece_bins < 1:
            raise UsageError(f"need at least one ECE bin, got {self.ece_bins}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"--temperature must be a positive number, got {self.temperature}")
        if self.boundary_band < 1:
            raise UsageError(f"--boundary-band must be at least 1, got {self.boundary_band}")
        if self.uncertainty:
            from .uncertainty import check_scores

            try:
                object.__setattr__(self, "uncertainty", check_scores(self.uncertainty))
            except ValueError as err:
                raise UsageError(f"--uncertainty: {err}") from None
        if not 0.0 <= self.qc_threshold <= 1.0:
            raise UsageError(f"--qc-threshold must be in [0, 1], got {self.qc_threshold}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise UsageError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes"
            )
        bad = [c for c in self.exclude_classes if not 0 <= c < self.num_classes]
        if bad:
            raise UsageError(
                f"--exclude-class {bad[0]} is not a class id 0..{self.num_classes - 1}"
            )
        object.__setattr__(
            self,
            "labels",
            LabelSpec(
                self.num_classes,
                tuple(self.ignore_index),
                label_map=self.label_map,
                reduce_zero_label=self.reduce_zero_label,
            ),
        )

    @property
    def mean_classes(self) -> tuple[int, ...]:
        """Class ids that the class means (miou, mdice, macc, fwiou) cover: every class but
        the ignore values inside 0..C−1 (they have no target pixels) and --exclude-class."""
        left_out = set(self.labels.ignored_classes) | set(self.exclude_classes)
        return tuple(c for c in range(self.num_classes) if c not in left_out)

    @property
    def unit(self) -> str:
        """What information quantities are measured in: nats, bits, or log base b."""
        return unit_label(self.log_base)

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, or the class ids as strings when none were given."""
        return self.class_names or tuple(str(c) for c in range(self.num_classes))

    @property
    def q_lo(self) -> float:
        """Smoothed target probability of every class but the label."""
        return self.smoothing / self.num_classes

    @property
    def q_hi(self) -> float:
        """Smoothed target probability of the label."""
        return 1.0 - self.smoothing + self.smoothing / self.num_classes

    def as_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "classes": list(self.names),
            "eps": self.eps,
            "smoothing": self.smoothing,
            "ignore_index": sorted(self.ignore_index),
            "input": self.input_kind,
            "log_base": self.log_base,
            "soft_gt": self.soft_gt,
            "ece_bins": self.ece_bins,
            "renormalize": self.renormalize,
            "label_map": self.label_map.as_dict() if self.label_map is not None else None,
            "reduce_zero_label": self.reduce_zero_label,
            "exclude_classes": [self.names[c] for c in sorted(self.exclude_classes)],
            "temperature": self.temperature,
            "calibration_views": self.calibration_views,
            "boundary_band": self.boundary_band,
            **self._uncertainty_dict(),
        } | ({"boundary": self.boundary.as_dict()} if self.boundary is not None else {})

    def _uncertainty_dict(self) -> dict:
        """``--uncertainty`` settings, recorded only when given (DESIGN §11)."""
        if not self.uncertainty:
            return {}
        return {"uncertainty": list(self.uncertainty), "qc_threshold": self.qc_threshold}

    @classmethod
    def from_dict(cls, d) -> MetricSettings:
        """The settings ``as_dict`` wrote (summary.json's ``settings``, stats.npz's); keys
        it does not know are left out."""
        d = dict(d)
        names = list(d.get("classes") or ())
        kwargs = {
            "num_classes": int(d["num_classes"]),
            "class_names": tuple(names),
            "input_kind": d.get("input", "probs"),
            "ignore_index": tuple(d.get("ignore_index", (255,))),
        }
        for key in ("eps", "smoothing", "log_base", "soft_gt", "ece_bins", "renormalize",
                    "reduce_zero_label", "temperature", "calibration_views",
                    "boundary_band"):  # fmt: skip
            if key in d:
                kwargs[key] = d[key]
        if d.get("label_map"):
            from .labels import BUILTIN_LABEL_MAPS

            name = str(d["label_map"]["name"])
            table = tuple(sorted((int(k), int(v)) for k, v in d["label_map"]["map"].items()))
            builtin = BUILTIN_LABEL_MAPS.get(name)
            kwargs["label_map"] = LabelMap(name, table, builtin[1] if builtin else ())
        if d.get("boundary"):
            kwargs["boundary"] = BoundaryOptions.from_dict(d["boundary"])
        if d.get("uncertainty"):
            kwargs["uncertainty"] = tuple(d["uncertainty"])
            kwargs["qc_threshold"] = float(d.get("qc_threshold", 0.5))
        excluded = d.get("exclude_classes") or ()
        kwargs["exclude_classes"] = tuple(
            names.index(c) if c in names else int(c) for c in excluded
        )
        return cls(**kwargs)


def unit_label(log_base: float) -> str:
    """The unit of KL, CE, JS and entropy for a log base: nats, bits, or "log base b"."""
    if log_base == math.e:
        return "nats"
    if log_base == 2:
        return "bits"
    return f"log base {log_base:g}"


@dataclass
class PixelTerms:
    """Per-pixel quantities for the n pixels of a chunk (nats, chunk dtype)."""

    kl: np.ndarray
    kl_reverse: np.ndarray | None  # None: undefined (infinite) for hard labels with ε = 0
    js: np.ndarray
    ce: np.ndarray
    entropy: np.ndarray
    brier: np.ndarray
    confidence: np.ndarray
    pred: np.ndarray  # argmax, ties to the lowest class index
    label: np.ndarray  # hard label (argmax of a soft target)
    n_clipped: int
    p: np.ndarray | None = None  # (C, n) probabilities, for the class-wise calibration sums


def _safe_log(x: np.ndarray) -> np.ndarray:
    """log(x) for x ≥ 0 that is finite at 0, so that 0 · _safe_log(0) = 0 (0·log 0 = 0).

    Adding the smallest normal number leaves every x above ~1e-31 (float32) unchanged, maps
    0 to log(tiny) ≈ -87, and is several times cheaper than ``np.maximum`` with a scalar.
    """
    tiny = np.finfo(x.dtype).tiny
    out = np.add(x, tiny)
    with np.errstate(invalid="ignore"):  # negative input: NaN, diagnosed by the caller
        return np.log(out, out=out)


def class_sum(M: np.ndarray) -> np.ndarray:
    """Σ over the class axis of a (C, n) array, adding class rows in order 0, 1, …, C-1.

    ``M.sum(axis=0)`` and ``einsum`` pick their summation order from the array's shape, so
    a pixel's float32 value could change with the chunk it falls in; a fixed order keeps
    every per-pixel value, and so every result, independent of the chunk size.
    """
    acc = M[0].copy()
    for c in range(1, M.shape[0]):
        np.add(acc, M[c], out=acc)
    return acc


def class_dot(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Σ_c A[c]·B[c] per pixel, in the fixed class order of ``class_sum``."""
    return class_sum(A * B)


def argmax_classes(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and argmax over the class axis of a (C, n) chunk; ties go to the lowest index.

    ``np.argmax(axis=0)`` walks pixel by pixel and is several times slower than this: the
    max is a vectorised reduction, the index of the (single) maximum is Σ_c c·[P_c = max]
    in small integers, and only the rare pixels with a tie are redone exactly. (A matrix
    product would do the sum too, but BLAS threads then fight ``--jobs`` processes.)
    """
    C, n = P.shape
    conf = P.max(axis=0)
    is_max = (P == conf).view(np.uint8)
    small = np.uint8 if C < 256 else np.uint16 if C < 65536 else np.uint32
    n_max = is_max.sum(axis=0, dtype=small)
    pred = np.zeros(n, dtype=small)
    term = np.empty(n, dtype=small)
    for c in range(1, C):
        np.multiply(is_max[c], small(c), out=term, casting="unsafe")  # c ≥ 256: no uint8
        pred += term
    pred = pred.astype(np.intp)
    ties = np.flatnonzero(n_max != 1)
    if ties.size:
        pred[ties] = np.argmax(P[:, ties], axis=0)
    return conf, pred


def log_softmax(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable log-softmax over the class axis of a (C, n) logits chunk: (log p, p)."""
    shifted = Z - Z.max(axis=0)
    p = np.exp(shifted)
    total = class_sum(p)
    p /= total
    shifted -= np.log(total)
    return shifted, p


def check_probabilities(
    P: np.ndarray, sums: np.ndarray, *, tolerance: float, soft_target: bool = False
) -> None:
    """Raise ProbabilityError unless every column of P is a distribution (within tolerance).

    The hint says what to do: ``--renormalize`` or ``--input logits`` for predictions; a
    soft target must be fixed where it is made."""
    if P.size == 0:
        return
    lo, hi = float(P.min()), float(P.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(P)))
        raise ProbabilityError(f"{bad} value{'s are' if bad != 1 else ' is'} NaN or infinite")
    off = np.abs(sums - 1.0)
    worst = float(off.max()) if off.size else 0.0
    if lo >= 0.0 and worst > tolerance and sums.size:
        s_lo, s_hi = float(sums.min()), float(sums.max())
        if s_hi - s_lo <= tolerance * max(1.0, s_hi) and not soft_target:  # all sum to k ≠ 1
            raise ProbabilityError(
                f"not a probability map: every pixel's values sum to {s_hi:.6g}, not 1; these "
                f"look like scaled probabilities (x{s_hi:.4g}, e.g. percentages): pass "
                "--renormalize to divide each pixel by its sum"
            )
    if lo < 0.0 or hi > 1.0 + tolerance or worst > tolerance:
        n_off = int(np.count_nonzero(off > tolerance))
        looks_like_logits = lo < 0.0 or hi > 1.0 + tolerance  # 1.0005 is a probability
        what = (
            f"values range over [{lo:.4g}, {hi:.4g}]"
            if (lo < 0.0 or hi > 1.0 + tolerance)
            else f"{n_off} pixels' class probabilities do not sum to 1 (worst off by {worst:.3g})"
        )
        hint = (
            "a soft target must hold one probability distribution per pixel"
            if soft_target
            else "this looks like logits: pass --input logits"
            if looks_like_logits
            else "pass --renormalize to divide each pixel by its sum, or check the class axis "
            "with `klseg info`"
        )
        raise ProbabilityError(f"not a probability map: {what}; {hint}")


def _plausible(sums, confidence, entropy, tolerance: float) -> bool:
    """Cheap test, on per-pixel results only, that a chunk holds valid distributions.

    A NaN or negative value makes its pixel's entropy NaN (log of a negative is NaN), an
    infinite one makes it infinite; the row sums and the maximum catch the rest.
    """
    if sums.size == 0:
        return True
    return bool(
        np.isfinite(entropy).all()
        and float(np.abs(sums - 1.0).max()) <= tolerance
        and float(confidence.max()) <= 1.0 + tolerance
    )


@dataclass
class PredictionTerms:
    """What a chunk's prediction alone gives: no target needed (``entropy``, ``confidence``)."""

    p: np.ndarray  # (C, n) probabilities
    logp: np.ndarray  # (C, n) log p, finite at p = 0 (see _safe_log)
    sums: np.ndarray  # (n,) Σ_c p
    confidence: np.ndarray
    pred: np.ndarray
    entropy: np.ndarray


def prediction_terms(
    P: np.ndarray, settings: MetricSettings, *, tolerance: float | None = None
) -> PredictionTerms:
    """Probabilities, logs, argmax and entropy of a (C, n) chunk (probabilities or logits).

    With ``tolerance`` set (probabilities only), the chunk is validated: a ProbabilityError
    says what is wrong with it.
    """
    if settings.input_kind == "logits":
        with np.errstate(invalid="ignore", over="ignore"):
            L, p = log_softmax(P)
    else:
        p = _renormalized(P, tolerance) if settings.renormalize else P
        L = _safe_log(p)
    sums = class_sum(p)
    confidence, pred = argmax_classes(p)
    entropy = -class_dot(p, L)
    if settings.input_kind == "logits" and not np.isfinite(entropy).all():
        bad = int(np.count_nonzero(~np.isfinite(P)))
        raise ProbabilityError(f"{bad} logits are NaN or infinite")
    if (
        tolerance is not None
        and settings.input_kind == "probs"
        and not _plausible(sums, confidence, entropy, tolerance)
    ):
        check_probabilities(p, sums, tolerance=tolerance)  # the full diagnosis; raises
    return PredictionTerms(p, L, sums, confidence, pred, entropy)


def _renormalized(P: np.ndarray, tolerance: float | None) -> np.ndarray:
    """P divided by each pixel's sum (``--renormalize``); refuses what no division mends."""
    raw = class_sum(P)
    if tolerance is not None and not (raw > 0).all():  # NaN, negative or all-zero pixels
        lo = float(np.nanmin(P)) if P.size else 0.0
        if not np.isfinite(P).all() or lo < 0:
            check_probabilities(P, raw, tolerance=tolerance)  # says NaN/negative; raises
        n_zero = int(np.count_nonzero(raw <= 0))
        raise ProbabilityError(f"{n_zero} pixels have all-zero probabilities; cannot renormalize")
    with np.errstate(invalid="ignore", divide="ignore"):
        return P / raw


def pixel_terms(
    P: np.ndarray,
    target: np.ndarray,
    settings: MetricSettings,
    *,
    tolerance: float | None = None,
) -> PixelTerms:
    """All per-pixel quantities of DESIGN §2 for a class-major chunk of valid pixels.

    ``target`` is (n,) integer labels, or a (C, n) soft target when ``settings.soft_gt``.
    With ``tolerance`` set (probabilities only), the chunk is validated first.

    log p̃ = max(log p, log eps) for probabilities and logits alike (DESIGN §2), and
    ``n_clipped`` counts every clipped value that enters a sum (a value enters when its
    target probability is not 0). Brier and JS are summed from terms that are each small
    when the prediction is confident and right (1 − p_y, and the other classes' p_c), never
    as a difference of numbers near 1, so they keep their relative accuracy there.
    """
    C, n = P.shape
    if C != settings.num_classes:
        raise ProbabilityError(f"prediction has {C} classes, expected {settings.num_classes}")
    P = np.ascontiguousarray(P)  # class rows contiguous: every pass below walks them
    dtype = P.dtype
    log_eps = dtype.type(math.log(settings.eps))
    pt = prediction_terms(P, settings, tolerance=tolerance)
    p, L, sums, confidence, pred, entropy = (
        pt.p,
        pt.logp,
        pt.sums,
        pt.confidence,
        pt.pred,
        pt.entropy,
    )
    if settings.soft_gt:
        return _soft_terms(p, L, target, settings, confidence, pred, entropy, sums, log_eps)

    y = target
    cols = np.arange(n)
    at_label = y * n + cols  # flat index of (y, col): no 2-D fancy indexing
    p_y = p.reshape(-1).take(at_label)
    L_y = L.reshape(-1).take(at_label) if settings.input_kind == "logits" else _safe_log(p_y)
    log2 = dtype.type(math.log(2.0))
    q_lo, q_hi = settings.q_lo, settings.q_hi
    work = np.empty(p.shape, dtype)  # one chunk-sized C-order scratch array, reused
    if q_lo == 0.0:
        n_clipped = _n_below(p_y, L_y, settings)
        ce = -np.maximum(L_y, log_eps)
        # H(q) = 0, so CE = KL ≥ 0; clamped like KL (p_y may exceed 1 within the tolerance)
        np.maximum(ce, 0.0, out=ce)
        kl = ce.copy()
        kl_reverse = None
        # Σ_{c≠y} p_c and Σ_{c≠y} p_c², summed without the label's term (not S − p_y)
        np.multiply(p, p, out=work)
        work.reshape(-1)[at_label] = 0.0
        others_sq = class_sum(work)
        np.copyto(work, p)
        work.reshape(-1)[at_label] = 0.0
        rest = class_sum(work)
        one_minus = dtype.type(1.0) - p_y  # exact for p_y ≥ ½
        brier = others_sq + one_minus * one_minus
        # JS against a one-hot target: ½[rest·log 2 + p_y·(log p_y − log m_y) − log m_y],
        # m_y = (1 + p_y)/2; log m_y in float64, where 1 + p_y is exact
        log_m_y = np.log((p_y.astype(np.float64) + 1.0) * 0.5).astype(dtype)
        js = rest * log2
        js += p_y * (L_y - log_m_y)
        js -= log_m_y
        js *= 0.5
    else:
        n_clipped = _n_below(p, L, settings)  # every class has q ≥ q_lo > 0
        Lt = np.maximum(L, log_eps)
        Lt_y = np.maximum(L_y, log_eps)
        lq_lo, lq_hi = math.log(q_lo), math.log(q_hi)
        ce = -(q_hi - q_lo) * Lt_y - q_lo * class_sum(Lt)
        neg_hq = q_hi * lq_hi + (C - 1) * q_lo * lq_lo  # Σ q log q, the same for every pixel
        kl = ce + dtype.type(neg_hq)
        # Σ_c p_c (log p_c − log q_c), term by term: small where p is close to q
        np.subtract(L, dtype.type(lq_lo), out=work)
        work *= p
        work.reshape(-1)[at_label] = p_y * (L_y - dtype.type(lq_hi))
        kl_reverse = class_sum(work)
        np.maximum(kl_reverse, 0.0, out=kl_reverse)
        # every class's term at q_lo, the label's replaced by its term at q_hi
        work[...] = _js_terms(p, L, q_lo, lq_lo)
        work.reshape(-1)[at_label] = _js_terms(p_y, L_y, q_hi, lq_hi)
        js = class_sum(work)
        js *= 0.5
        np.subtract(p, dtype.type(q_lo), out=work)
        np.multiply(work, work, out=work)
        d_y = p_y - dtype.type(q_hi)
        work.reshape(-1)[at_label] = d_y * d_y
        brier = class_sum(work)
    np.maximum(kl, 0.0, out=kl)
    np.maximum(js, 0.0, out=js)
    return PixelTerms(
        kl=kl,
        kl_reverse=kl_reverse,
        js=js,
        ce=ce,
        entropy=entropy,
        brier=brier,
        confidence=confidence,
        pred=pred,
        label=y,
        n_clipped=n_clipped,
        p=p,
    )


def _n_below(p, logp, settings: MetricSettings, *, where=None) -> int:
    """How many values max(·, eps) clips: p < eps for probabilities (compared as stored, so
    eps itself is not clipped), log p < log eps for logits; only ``where`` counts."""
    if settings.input_kind == "logits":
        below = logp < logp.dtype.type(math.log(settings.eps))
    else:
        below = p < p.dtype.type(settings.eps)
    if where is not None:
        below &= where
    return int(np.count_nonzero(below))


def _js_terms(p: np.ndarray, logp: np.ndarray, q, logq) -> np.ndarray:
    """Elementwise p·log(2p/(p+q)) + q·log(2q/(p+q)), with 0·log 0 = 0.

    ``logp``/``logq`` are logs that stay finite at 0 (see ``_safe_log``). Summed over classes
    and halved this is JS(p, q) ≤ log 2.
    """
    log2 = p.dtype.type(math.log(2.0))
    m = p + q
    log_m = _safe_log(m)
    return p * (log2 + logp - log_m) + q * (log2 + logq - log_m)


def _soft_terms(p, L, Q, settings, confidence, pred, entropy, sums, log_eps) -> PixelTerms:
    """Per-pixel terms against a soft (C, n) target distribution."""
    Lt = np.maximum(L, log_eps)
    logQ = _safe_log(Q)
    _, y = argmax_classes(Q)
    n_clipped = _n_below(p, L, settings, where=Q > 0)
    ce = -class_dot(Q, Lt)
    kl = class_dot(Q, logQ) + ce
    np.maximum(kl, 0.0, out=kl)
    # KL(p‖q) is infinite where q = 0 < p: keep it infinite, never clip it away.
    with np.errstate(divide="ignore", invalid="ignore"):
        rev = p * (L - np.log(Q))
    rev[p == 0] = 0.0
    kl_reverse = class_sum(rev)
    np.maximum(kl_reverse, 0.0, out=kl_reverse)
    js = 0.5 * class_sum(_js_terms(p, L, Q, logQ))
    np.maximum(js, 0.0, out=js)
    diff = p - Q
    brier = class_dot(diff, diff)
    return PixelTerms(
        kl=kl,
        kl_reverse=kl_reverse,
        js=js,
        ce=ce,
        entropy=entropy,
        brier=brier,
        confidence=confidence,
        pred=pred,
        label=y,
        n_clipped=n_clipped,
        p=p,
    )


def ece_bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin b (0-based) with confidence in (b/bins, (b+1)/bins]; 1.0 is in the last bin.

    Computed in float64, where ``conf * bins`` is exact for float32 input, so a confidence
    lands in the same bin as in an exact computation (a float32 0.2 is above 1/5).
    """
    idx = np.ceil(confidence.astype(np.float64) * bins).astype(np.intp) - 1
    np.clip(idx, 0, bins - 1, out=idx)
    return idx
