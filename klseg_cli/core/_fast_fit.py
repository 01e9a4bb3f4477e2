"""Compiled pass of the temperature fit (numba, as the evaluation kernel) for the common case.

Scope as the evaluation kernel's (``_fast.py``): probabilities, hard labels, no smoothing,
float32 maps. One call per chunk, tile by tile (an HWC tile is first copied class-major
into a small buffer), computes for a = 1/T the sums of ``calibration.chunk_objective``:

    Σ NLL = Σ [log Σ_c exp(a·l_c) − a·l_y],  Σ E_r[l] − l_y,  Σ Var_r[l],   l = log p̃

with the kernel's polynomial float32 log (``_fast._log``) and a polynomial exp below, each
a few float32 operations that LLVM vectorises, and float64 sums. Ignored pixels are masked;
a chunk that fails a check (NaN, negative values, pixels not summing to 1) returns
``ok = False`` with nothing summed, and the NumPy path then diagnoses it.
"""

from __future__ import annotations

import math

import numpy as np

from . import _fast

AVAILABLE = _fast.AVAILABLE
TILE = 128

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06

if AVAILABLE:
    import numba

    from ._fast import _as_float32, _log

    _flags = {"reassoc", "contract", "arcp", "afn"}
    _i32 = np.int32
    _f32 = np.float32

    @numba.njit(inline="always", fastmath=_flags, error_model="numpy")
    def _exp_neg(x):
        """exp x for x ≤ 0 (float32; below −87 it is taken as exp(−87) ≈ 1.6e-38, which
        adds nothing next to the pixel's largest term, 1). Degree-7 Taylor on the reduced
        argument |f| ≤ ln2/2: relative error below 1e-8 before float32 rounding."""
        x = x if x > _f32(-87.0) else _f32(-87.0)
        n = _i32(x * _f32(_LOG2E) - _f32(0.5))  # rounds to nearest for x ≤ 0
        fn = _f32(n)
        f = (x - fn * _f32(_LN2_HI)) - fn * _f32(_LN2_LO)
        p = _f32(1.0) + f * (
            _f32(1.0)
            + f
            * (
                _f32(0.5)
                + f
                * (
                    _f32(1 / 6)
                    + f
                    * (
                        _f32(1 / 24)
                        + f * (_f32(1 / 120) + f * (_f32(1 / 720) + f * _f32(1 / 5040)))
                    )
                )
            )
        )
        return p * _as_float32(_i32((n + _i32(127)) << _i32(23)))

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _tile(Xi, x0, m, y, a, log_eps, tol, Lb, S, M, B, S0, S1, S2, LY, V):
        """One tile of m pixels of the class-major int32 bits ``Xi`` (from column x0);
        returns (bad, n_valid, Σnll, Σgrad, Σcurv)."""
        C = Xi.shape[0]
        u0 = np.uint64(x0)
        for i in range(m):
            S[i] = _f32(0.0)
            M[i] = _f32(-1e30)
            B[i] = _i32(0)
        for c in range(C):
            for i in range(m):
                b = Xi[c, u0 + np.uint64(i)]
                x = _as_float32(b)
                lg = _log(b)
                lt = lg if lg > log_eps else log_eps
                Lb[c, i] = lt
                S[i] += x
                M[i] = lt if lt > M[i] else M[i]
                B[i] = _i32(B[i] | b)
        for i in range(m):  # the label's log p̃ (a gather), the valid mask
            lab = np.int64(y[i])
            v = (lab >= 0) & (lab < C)
            V[i] = _i32(1) if v else _i32(0)
            LY[i] = Lb[np.uint64(lab if v else 0), i]
            S0[i] = _f32(0.0)
            S1[i] = _f32(0.0)
            S2[i] = _f32(0.0)
        fa = _f32(a)
        for c in range(C):
            for i in range(m):
                lt = Lb[c, i]
                e = _exp_neg(fa * (lt - M[i]))
                el = e * lt
                S0[i] += e
                S1[i] += el
                S2[i] += el * lt
        bad = _i32(0)
        n_valid = _i32(0)
        nll = 0.0
        grad = 0.0
        curv = 0.0
        log_hi = _f32(math.log1p(tol))
        S0i = S0.view(np.int32)
        for i in range(m):
            v = V[i]
            good = (abs(S[i] - _f32(1.0)) <= tol) & (M[i] <= log_hi) & (B[i] >= 0)
            bad |= v & (_i32(0) if good else _i32(1))
            n_valid += v
            s0 = S0[i]
            mean = S1[i] / s0
            var = S2[i] / s0 - mean * mean
            var = var if var > _f32(0.0) else _f32(0.0)
            s = _log(S0i[i]) + fa * M[i]  # S0 ≥ 1: the largest term is exp(0)
            nll += np.float64(s - fa * LY[i]) if v else 0.0
            grad += np.float64(mean - LY[i]) if v else 0.0
            curv += np.float64(var) if v else 0.0
        return bad, n_valid, nll, grad, curv

    @numba.njit(error_model="numpy", cache=True, nogil=True)
    def _chunk(P, start, y, pixel_major, a, log_eps, tol):
        n = y.shape[0]
        C = P.shape[1] if pixel_major else P.shape[0]
        w = min(n, TILE)
        Lb = np.empty((C, w), np.float32)
        T = np.empty((C, w if pixel_major else 0), np.float32)
        f = np.empty((7, w), np.float32)
        S, M, S0, S1, S2, LY = f[0], f[1], f[2], f[3], f[4], f[5]
        g = np.empty((2, w), np.int32)
        B, V = g[0], g[1]
        acc = np.zeros(3)
        nv = 0
        for t0 in range(0, n, w):
            m = min(w, n - t0)
            if pixel_major:
                for k in range(m):
                    for c in range(C):
                        T[c, k] = P[t0 + k, c]
                X, x0 = T, 0
            else:
                X, x0 = P, start + t0
            bad, k, a1, a2, a3 = _tile(X.view(np.int32), x0, m, y[t0 : t0 + m], a, log_eps, tol,
                                       Lb, S, M, B, S0, S1, S2, LY, V)  # fmt: skip
            if bad:
                return False, 0, 0.0, 0.0, 0.0
            nv += k
            acc[0] += a1
            acc[1] += a2
            acc[2] += a3
        return True, nv, acc[0], acc[1], acc[2]


if AVAILABLE:

    @numba.njit(error_model="numpy", cache=True, nogil=True)
    def _classwise(p, y, bins, counts, sums, hits):
        C, n = p.shape
        for c in range(C):
            for i in range(n):
                x = p[c, i]
                b = np.int64(math.ceil(np.float64(x) * bins)) - 1  # exact for float32 x
                b = 0 if b < 0 else (bins - 1 if b > bins - 1 else b)
                counts[c, b] += 1
                sums[c, b] += x
                if y[i] == c:
                    hits[c, b] += 1


def classwise_sums(p: np.ndarray, y: np.ndarray, bins: int, counts, sums, hits) -> None:
    """Add the one-vs-rest bins of a (C, n) chunk's probabilities to (C, bins) ``counts``,
    ``sums`` (Σp_c) and ``hits`` (Σ1[y = c]) in place (calibration_views' class-wise ECE)."""
    _classwise(np.ascontiguousarray(p), np.ascontiguousarray(y, dtype=np.int64), bins,
               counts, sums, hits)  # fmt: skip


def supported(settings, dtype) -> bool:
    """Whether the compiled pass covers these settings (else the NumPy pass is used)."""
    return (
        AVAILABLE
        and settings.input_kind == "probs"
        and not settings.soft_gt
        and settings.smoothing == 0.0
        and not settings.renormalize
        and np.dtype(dtype) == np.float32
    )


def chunk_sums(P: np.ndarray, y: np.ndarray, a: float, settings, tolerance: float, *,
               pixel_major: bool = False, start: int = 0):  # fmt: skip
    """(ok, n_valid, Σnll, Σgrad, Σcurv) of a float32 chunk with raw labels ``y``.

    ``P`` is (C, n) class-major, (n, C) with ``pixel_major``, or a whole map's (C, H·W)
    planes with the chunk starting at ``start``. ``ok`` is False when the chunk needs the
    NumPy path (which then raises the error).
    """
    P = np.ascontiguousarray(P, dtype=np.float32)
    if not np.can_cast(y.dtype, np.int32):  # wide labels: masked ones become −1 first
        C = P.shape[1] if pixel_major else P.shape[0]
        y = np.where((y >= 0) & (y < C), y, -1)
    y = np.ascontiguousarray(y, dtype=np.int32)  # one compiled specialisation
    ok, n, f, g, h = _chunk(P, start, y, pixel_major, float(a),
                            np.float32(math.log(settings.eps)), np.float32(tolerance))  # fmt: skip
    return bool(ok), int(n), float(f), float(g), float(h)
