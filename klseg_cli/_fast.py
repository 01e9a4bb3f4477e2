"""Optional compiled kernel (``pip install 'klseg[fast]'``, numba) for the common case.

Scope: probabilities (not logits), hard labels, no label smoothing, float32 chunks. There the
NumPy path spends most of its time in ``np.log`` (about 2.5 ns a value here, ten sum passes
for a Cityscapes map) and in a dozen further passes over the chunk. This kernel makes one
fused pass per class plane with a vectorisable float32 log (for HWC maps: one x·log x pass
over the chunk as stored, then each pixel's row reduced in place, with no transpose), then
per-pixel passes for KL/JS/Brier and the scattered updates of the confusion matrix and the
ECE bins.

It computes the same formulas as ``metrics.pixel_terms`` (DESIGN §2); per-pixel values agree
with the NumPy path to a few float32 ulps and the sums to ~1e-7 relative, which
``tests/test_fast.py`` checks. Anything out of scope, or a chunk that fails validation, goes
to the NumPy path, which also produces the error message.
"""

from __future__ import annotations

import math
import os

import numpy as np

try:  # numba is optional
    if os.environ.get("KLSEG_NO_NUMBA"):
        raise ImportError
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

AVAILABLE = numba is not None

_LN2_HI = 0.693145751953125  # ln 2 split so that e·LN2_HI is exact in float32
_LN2_LO = 1.428606765330187e-06
_SQRT2 = 1.4142135


if AVAILABLE:
    _flags = {"reassoc", "contract", "arcp", "afn"}  # no 'nnan'/'ninf': validation sees them

    @numba.njit(inline="always", fastmath=_flags, error_model="numpy")
    def _log_bits(bits):
        """log(x) from the int32 bits of a float32 x ≥ 0; finite (≈ -88) at 0.

        x = 2^e · m with m in [√½, √2); log m = 2·atanh(s), s = (m − 1)/(m + 1), |s| < 0.172,
        by its odd series to s⁹ (error < 1e-9); e·ln 2 in two parts, so it is exact.
        Everything is int32/float32 arithmetic and selects: LLVM vectorises it (8 lanes).
        """
        e = np.float32(np.int32((bits >> 23) & 0xFF) - np.int32(127))
        m = np.float32(1.0) + np.float32(np.int32(bits & 0x7FFFFF)) * np.float32(
            1.1920928955078125e-07
        )
        big = m > np.float32(_SQRT2)
        m = np.float32(0.5) * m if big else m
        e = e + np.float32(1.0) if big else e
        s = (m - np.float32(1.0)) / (m + np.float32(1.0))
        z = s * s
        poly = np.float32(1.0) + z * (
            np.float32(1 / 3)
            + z * (np.float32(1 / 5) + z * (np.float32(1 / 7) + z * np.float32(1 / 9)))
        )
        return e * np.float32(_LN2_HI) + (np.float32(2.0) * s * poly + e * np.float32(_LN2_LO))

    @numba.njit(inline="always", fastmath=_flags, error_model="numpy")
    def _log_half_up(p):
        """log((1 + p)/2) for p in [0, 1], precise when p ≈ 1 (1 − p is exact there)."""
        d = np.float32(1.0) - p
        s = -d / (np.float32(4.0) - d)  # atanh form: (1 + s)/(1 - s) = (1 + p)/2
        z = s * s
        poly = np.float32(1.0) + z * (
            np.float32(1 / 3)
            + z
            * (
                np.float32(1 / 5)
                + z
                * (
                    np.float32(1 / 7)
                    + z * (np.float32(1 / 9) + z * (np.float32(1 / 11) + z * np.float32(1 / 13)))
                )
            )
        )
        return np.float32(2.0) * s * poly

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _planes(P, Pi, S, H, Q, M, A):
        """One pass per class plane: Σp, −Σp log p, Σp², max and first argmax.

        Written with selects, not branches, so that the loop over pixels vectorises. A NaN
        makes Σp NaN and an infinity makes it infinite; both fail the check in ``_pixels``.
        """
        C, n = P.shape
        for i in range(n):
            x = P[0, i]
            S[i] = x
            H[i] = -x * _log_bits(Pi[0, i])
            Q[i] = x * x
            M[i] = x
            A[i] = np.int32(0)
        for c in range(1, C):
            for i in range(n):
                x = P[c, i]
                S[i] += x
                H[i] -= x * _log_bits(Pi[c, i])
                Q[i] += x * x
                better = x > M[i]
                M[i] = x if better else M[i]
                A[i] = np.int32(c) if better else A[i]

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _xlogx(R, Ri, XL):
        """x·log x over a flat, contiguous array (pixel-major maps): one vectorised pass."""
        for k in range(R.shape[0]):
            XL[k] = R[k] * _log_bits(Ri[k])

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _pixel_rows(R, XL, C, S, H, Q, M, A):
        """Σp, −Σp log p, Σp², max and first argmax of each pixel's C contiguous values.

        For HWC maps: reduces each pixel's row in place instead of transposing the chunk,
        which cost as much as the class-plane pass itself.
        """
        for i in range(S.shape[0]):
            base = i * C
            s = np.float32(0.0)
            h = np.float32(0.0)
            q = np.float32(0.0)
            for c in range(C):
                x = R[base + c]
                s += x
                h -= XL[base + c]
                q += x * x
            m = R[base]
            a = 0
            for c in range(1, C):
                x = R[base + c]
                if x > m:
                    m = x
                    a = c
            S[i] = s
            H[i] = h
            Q[i] = q
            M[i] = m
            A[i] = a

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _terms(py, pyi, S, Q, log_eps, eps, KL, JS, BR):
        """Per-pixel KL (= CE), JS and Brier from the label's probability (vectorised)."""
        n = py.shape[0]
        ln2 = np.float32(math.log(2.0))
        clipped = 0
        for i in range(n):
            p = py[i]
            ly = _log_bits(pyi[i])
            clipped += 1 if p < eps else 0
            KL[i] = -(ly if ly > log_eps else log_eps)
            log_m = _log_half_up(p)
            js = np.float32(0.5) * ((S[i] - p) * ln2 + p * (ly - log_m) - log_m)
            JS[i] = js if js > np.float32(0.0) else np.float32(0.0)
            BR[i] = Q[i] - np.float32(2.0) * p + np.float32(1.0)
        return clipped

    @numba.njit(error_model="numpy", cache=True)
    def _scatter(y, A, M, KL, bins, cm, class_kl, ece_n, ece_conf, ece_ok):
        """Confusion matrix, per-class KL and ECE bins: the scattered updates."""
        for i in range(y.shape[0]):
            c = y[i]
            a = A[i]
            cm[c, a] += 1
            class_kl[c] += KL[i]
            b = min(max(int(math.ceil(np.float64(M[i]) * bins)) - 1, 0), bins - 1)  # noqa: RUF046
            ece_n[b] += 1
            ece_conf[b] += M[i]
            ece_ok[b] += 1 if a == c else 0


def supported(settings, dtype) -> bool:
    """Whether the kernel covers these settings (everything else uses the NumPy path)."""
    return (
        AVAILABLE
        and settings.input_kind == "probs"
        and not settings.soft_gt
        and settings.smoothing == 0.0
        and not settings.renormalize
        and np.dtype(dtype) == np.float32
    )


def chunk_stats(P: np.ndarray, y: np.ndarray, settings, tolerance: float, *,
                pixel_major: bool = False):  # fmt: skip
    """Stats of a float32 chunk with labels y, or None when it needs the NumPy path.

    ``P`` is (C, n) class-major, or with ``pixel_major`` (n, C) as HWC maps store it.
    """
    from .stats import Stats

    n, C = P.shape if pixel_major else P.shape[::-1]
    out = Stats.zeros(C, settings.ece_bins)
    out.sums[1] = np.nan  # KL(p‖q) is infinite against one-hot targets: not computed
    if n == 0:
        out.sums[1] = 0.0
        return out
    P = np.ascontiguousarray(P)
    lo = float(P.min())  # NaN if any value is NaN
    if not lo >= 0.0:
        return None  # NaN or negative: the NumPy path says what is wrong
    S, H, Q, M, KL, JS, BR = (np.empty(n, np.float32) for _ in range(7))
    A = np.empty(n, np.int32)
    flat = P.reshape(-1)
    if pixel_major:
        XL = np.empty_like(flat)
        _xlogx(flat, flat.view(np.int32), XL)
        _pixel_rows(flat, XL, C, S, H, Q, M, A)
        index = np.arange(n) * C + y
    else:
        _planes(P, P.view(np.int32), S, H, Q, M, A)
        index = y * n + np.arange(n)
    if not (float(np.abs(S - 1.0).max()) <= tolerance and float(M.max()) <= 1.0 + tolerance):
        return None  # not summing to 1, above 1 or infinite
    y = np.ascontiguousarray(y, dtype=np.intp)
    eps = settings.eps
    py = flat.take(index)  # the label's probability, gathered by NumPy
    clipped = _terms(py, py.view(np.int32), S, Q, np.float32(math.log(eps)), np.float32(eps),
                     KL, JS, BR)  # fmt: skip
    ece_conf = np.zeros(settings.ece_bins)
    _scatter(y, A, M, KL, settings.ece_bins, out.confusion, out.class_kl, out.ece_count,
             ece_conf, out.ece_correct)  # fmt: skip
    kl = np.sum(KL, dtype=np.float64)
    out.sums[[0, 2, 3, 4, 5]] = [
        kl,
        np.sum(JS, dtype=np.float64),
        kl,
        np.sum(H, dtype=np.float64),
        np.sum(BR, dtype=np.float64),
    ]
    out.ece_conf = ece_conf
    out.class_ce = out.class_kl.copy()
    out.n_clipped = int(clipped)
    return out
