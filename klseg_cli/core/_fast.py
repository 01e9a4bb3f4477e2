"""The compiled kernel (numba, installed with klseg where it has wheels) for the common case.

Scope: probabilities (not logits), hard labels, no label smoothing, float32 (and float16)
maps. There the NumPy path spends most of its time in ``np.log`` (about 2.5 ns a value
here, ten sum passes for a Cityscapes map) and in a dozen further passes over each chunk.
This kernel does a chunk in one call that releases the GIL, tile by tile (so that the
per-pixel scratch stays in the L1 cache), in three steps:

1. ``_labels`` and ``_planes``: the labels and their probabilities, then one pass over
   each pair of class planes accumulating, per pixel, Σp and Σp² over the classes other
   than the running maximum (so Brier and JS of a confident pixel never subtract numbers
   near 1), Σp·log p, the maximum, its class and the OR of the values' sign bits (an HWC
   tile is first copied class-major into a small buffer; CHW planes are read in place);
2. ``_pixels``: KL (= CE against a one-hot target, clamped at 0), JS, Brier, the checks
   and the float64 sums, in short loops;
3. ``_scatter``: confusion matrix, per-class KL and the ECE bins.

Steps 1 and 2 use selects rather than branches and int32 bit arithmetic, so that LLVM
vectorises them (8 float32 lanes with AVX2); indices are unsigned, or numba would add a
negative-index check that stops it; and each loop writes few arrays, because LLVM gives up
vectorising when it would have to check too many pairs of arrays for overlap at run time.
The logarithm (``_log``) is a polynomial on the float's mantissa, within 1.2 float32 ulp.

It computes the formulas of ``metrics.pixel_terms`` (DESIGN §2); per-pixel values agree with
the NumPy path to a few float32 ulps and the sums to ~1e-7 relative, which
``tests/test_fast.py`` checks. Ignored pixels are masked, not removed. A chunk that fails a
check (NaN, negative values, pixels not summing to 1) leaves no trace in the totals: it goes
to the NumPy path, which also produces the error message.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import AVAILABLE, CACHE_DIR, FASTMATH, numba  # noqa: F401 (CACHE_DIR: the public name)

if AVAILABLE:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

TILE_HWC = 256
"""Pixels per tile of an HWC chunk, which is copied class-major first: 19 classes × 256 ×
4 bytes is 19 KB, so the tile and its accumulators stay in the L1 cache."""
TILE_CHW = 1024
"""Pixels per tile of a CHW chunk, read in place: the accumulators (a few KB) stay in L1."""

_LN2_HI = 0.693145751953125  # ln 2 split so that e·LN2_HI is exact in float32
_LN2_LO = 1.428606765330187e-06
_SQRT_HALF_BITS = 0x3F3504F3  # the float32 bits of √½
# log(1 + f) ≈ f − f²/2 + f³·P(f) on f ∈ [√½ − 1, √2 − 1]: P of degree 6 fitted to the
# relative error of log(1 + f) by iteratively reweighted least squares on Chebyshev nodes
# (scripts/fit_log.py); in float32 arithmetic the result is within 1.2 ulp of log x
# (tests/test_fast.py).
_P = (
    0.3333394307094386,
    -0.25001222843291615,
    0.19961899521171317,
    -0.1658046246539029,
    0.14929038781285692,
    -0.14249981951514365,
    0.08639069805362529,
)


if AVAILABLE:
    _flags = FASTMATH
    _i32 = np.int32
    _f32 = np.float32
    _P0, _P1, _P2, _P3, _P4, _P5, _P6 = (np.float32(c) for c in _P)

    @intrinsic
    def _as_float32(typingctx, bits):
        """The float32 whose bits are the int32 ``bits`` (a register move, no conversion)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    @numba.njit(inline="always", fastmath=_flags, error_model="numpy")
    def _log(bits):
        """log x from the int32 bits of a float32 x ≥ 0; finite (≈ −88) at 0.

        x = 2^e · m with m in [√½, √2): subtracting the bits of √½ puts e in the high bits
        and m's mantissa in the low ones. Every operation is int32 or float32 (each int is
        cast back, or numba would widen it to int64), so the loop vectorises.
        """
        t = _i32(bits - _i32(_SQRT_HALF_BITS))
        e = _f32(_i32(t >> 23))
        f = _as_float32(_i32(_i32(t & _i32(0x7FFFFF)) + _i32(_SQRT_HALF_BITS))) - _f32(1.0)
        z = f * f
        z2 = z * z
        p = (_P0 + _P1 * f + (_P2 + _P3 * f) * z) + (_P4 + _P5 * f + _P6 * z) * z2
        r = f + (z * f * p - _f32(0.5) * z)
        return e * _f32(_LN2_HI) + (r + e * _f32(_LN2_LO))

    @numba.njit(inline="always", fastmath=_flags, error_model="numpy")
    def _log_half_up(p):
        """log((1 + p)/2) for p in [0, 1], precise when p ≈ 1 (1 − p is exact there)."""
        d = _f32(1.0) - p
        s = -d / (_f32(4.0) - d)  # atanh form: (1 + s)/(1 - s) = (1 + p)/2
        z = s * s
        poly = _f32(1.0) + z * (
            _f32(1 / 3)
            + z
            * (
                _f32(1 / 5)
                + z * (_f32(1 / 7) + z * (_f32(1 / 9) + z * (_f32(1 / 11) + z * _f32(1 / 13))))
            )
        )
        return _f32(2.0) * s * poly

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _labels(P, y, x0, m, V, L, PY):
        """The first m pixels' validity, class (0 where ignored) and label probability."""
        C = P.shape[0]
        for i in range(m):  # a gather
            lab = np.int64(y[i])
            v = (lab >= 0) & (lab < C)
            V[i] = _i32(1) if v else _i32(0)
            L[i] = _i32(lab) if v else _i32(0)
            PY[i] = P[np.uint64(L[i]), np.uint64(x0) + np.uint64(i)]

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _planes(Pi, t0, m, S, H, Q, M, A, B):
        """Loop 1 over pixels t0 … t0+m−1 of class-major (C, n) float32 values, given as
        their int32 bits ``Pi``: per pixel Σp and Σp² over every class but the (running)
        maximum — so that Brier and JS of a confident pixel need no difference of numbers
        near 1 —, Σp log p, the max, its first class and the OR of the values' bits
        (negative when a value has its sign bit set)."""
        C = Pi.shape[0]
        u0 = np.uint64(t0)  # unsigned indices: numba adds no negative-index wraparound
        for i in range(m):
            j = u0 + np.uint64(i)
            b = Pi[0, j]
            x = _as_float32(b)
            S[i] = _f32(0.0)
            H[i] = x * _log(b)
            Q[i] = _f32(0.0)
            M[i] = x
            A[i] = _i32(0)
            B[i] = b
        for c in range(1, C - 1, 2):  # two planes a pass: half the accumulator traffic
            for i in range(m):
                j = u0 + np.uint64(i)
                b = Pi[c, j]
                b2 = Pi[c + 1, j]
                x = _as_float32(b)
                x2 = _as_float32(b2)
                H[i] += x * _log(b) + x2 * _log(b2)
                mx = M[i]
                ax = A[i]
                better = x > mx
                lo = mx if better else x  # the value that is not the new maximum
                mx = x if better else mx
                ax = _i32(c) if better else ax
                better = x2 > mx
                lo2 = mx if better else x2
                M[i] = x2 if better else mx
                A[i] = _i32(c + 1) if better else ax
                S[i] += lo + lo2
                Q[i] += lo * lo + lo2 * lo2
                B[i] = _i32(B[i] | _i32(b | b2))
        if C % 2 == 0:
            c = C - 1
            for i in range(m):
                j = u0 + np.uint64(i)
                b = Pi[c, j]
                x = _as_float32(b)
                H[i] += x * _log(b)
                mx = M[i]
                better = x > mx
                lo = mx if better else x
                S[i] += lo
                Q[i] += lo * lo
                M[i] = x if better else mx
                A[i] = _i32(c) if better else A[i]
                B[i] = _i32(B[i] | b)

    @numba.njit(fastmath=_flags, error_model="numpy", cache=True)
    def _pixels(S, H, Q, M, A, B, V, L, PY, KL, JS, E, CI, m, tol, log_eps, eps, bins, C):
        """Loop 2: per-pixel KL, JS, Brier and checks of the first m pixels, summed.

        ``S`` and ``Q`` hold Σp and Σp² over the classes other than the maximum ``M``: when
        the label is the argmax they are Σ and Σ² over the other classes exactly; otherwise
        p_y ≤ ½ and the label's term is swapped in without cancellation. Ignored
        pixels (``V`` = 0) are masked, not removed. Several short loops rather than one:
        LLVM vectorises a loop only after checking at run time that the arrays it writes
        overlap none it reads, and gives up beyond a few such checks — so each loop writes
        one or two arrays, and the sums (which write none) come last. Flags are int32 0/1,
        so that no loop widens to int64.
        Returns (bad, n_valid, n_clipped, Σkl, Σjs, Σentropy, Σbrier).
        """
        PYi = PY.view(np.int32)
        ln2 = _f32(math.log(2.0))
        zero = _f32(0.0)
        for i in range(m):  # S, Q → over the classes other than the label
            p = PY[i]
            top = A[i] == L[i]
            mx = M[i]
            S[i] = S[i] if top else S[i] + (mx - p)
            Q[i] = Q[i] if top else Q[i] + (mx * mx - p * p)
        for i in range(m):
            p = PY[i]
            ly = _log(PYi[i])
            # KL = CE = −log p̃_y, clamped at 0 (DESIGN §2): a pixel summing to within the
            # tolerance above 1 can have p_y > 1 and so −log p_y < 0
            kl = -(ly if ly > log_eps else log_eps)
            KL[i] = kl if kl > zero else zero
            log_m = _log_half_up(p)
            js = _f32(0.5) * (S[i] * ln2 + p * (ly - log_m) - log_m)
            JS[i] = js if js > zero else zero
        for i in range(m):  # ECE bin and correctness as 2·bin + [correct]; confusion cell
            b = _i32(np.ceil(np.float64(M[i]) * bins)) - _i32(1)  # float64 → int32 vectorises
            b = b if b > _i32(0) else _i32(0)
            b = b if b < _i32(bins - 1) else _i32(bins - 1)
            E[i] = _i32(_i32(2) * b + (_i32(1) if A[i] == L[i] else _i32(0)))
            CI[i] = _i32(L[i] * _i32(C) + A[i])
        bad = _i32(0)
        n_valid = _i32(0)
        clipped = _i32(0)
        kl_sum = 0.0
        js_sum = 0.0
        ent_sum = 0.0
        br_sum = 0.0
        for i in range(m):  # checks and sums (this loop writes no array)
            v = V[i]
            p = PY[i]
            good = (abs(S[i] + p - _f32(1.0)) <= tol) & (M[i] <= _f32(1.0) + tol) & (B[i] >= 0)
            bad |= v & (_i32(0) if good else _i32(1))
            clipped += v & (_i32(1) if p < eps else _i32(0))
            n_valid += v
            d = _f32(1.0) - p
            br = Q[i] + d * d
            kl_sum += np.float64(KL[i]) if v else 0.0
            js_sum += np.float64(JS[i]) if v else 0.0
            ent_sum -= np.float64(H[i]) if v else 0.0
            br_sum += np.float64(br) if v else 0.0
        return bad, n_valid, clipped, kl_sum, js_sum, ent_sum, br_sum

    @numba.njit(error_model="numpy", cache=True)
    def _scatter(m, V, CI, E, L, KL, M, nc, counts, fsums):
        """Loop 3: the scattered updates of the first m valid pixels.

        ``counts`` holds the confusion matrix (cell label·C + predicted, from ``CI``) and
        then the ECE counts (cell C² + 2·bin + [correct], from ``E``); ``fsums`` the
        per-class KL sums and then the per-bin confidence sums (cell C + bin). One array of
        each kind keeps the loop's pointers in registers. (Four copies taken in turn, to
        break the chains of updates to one cell, measured 1.5x slower.)
        """
        cc = np.uint64(nc * nc)
        c1 = np.uint64(nc)
        one = np.uint64(1)
        for i in range(m):
            if V[i] == 0:
                continue
            e = np.uint64(E[i])
            counts[np.uint64(CI[i])] += 1
            counts[cc + e] += 1
            fsums[np.uint64(L[i])] += KL[i]
            fsums[c1 + (e >> one)] += M[i]

    from . import _fast_uncertainty as _fu  # --uncertainty (needs _flags above)

    @numba.njit(error_model="numpy", cache=True, nogil=True)  # threads run chunks in parallel
    def _chunk(P, start, y, pixel_major, tile, tol, log_eps, eps, bins,
               sums, cm, class_kl, class_ce, ece_n, ece_conf, ece_ok,
               unc, unc_hist, unc_sum):  # fmt: skip
        """One chunk, added to the totals only if every check passes; returns (ok, n_clipped).

        The chunk is pixels start … start + len(y) − 1 of ``P``, which is class-major
        (C, ≥ start + n), or pixel-major (n, C) with ``pixel_major`` (then start is 0);
        ``y`` holds the chunk's class codes or plain labels (outside 0..C−1: masked). Pixels go by
        tiles of ``tile``: an HWC tile is copied class-major into a small buffer first (in
        cache), CHW planes are read in place. ``unc`` (``--uncertainty``): the codes of the
        failure-detection scores, whose histograms (S, 2·BINS) and sums (S,) are
        ``unc_hist`` and ``unc_sum`` (``_fast_uncertainty``); empty: none.
        """
        n = y.shape[0]
        n_unc = unc.shape[0]
        cells = np.empty((n_unc, n if n_unc else 0), np.int32)
        unc_acc = np.zeros(n_unc)
        C = P.shape[1] if pixel_major else P.shape[0]
        w = min(n, tile)
        f = np.empty((7, w), np.float32)  # per-pixel scratch, one row each
        S, H, Q, M, KL, JS, PY = f[0], f[1], f[2], f[3], f[4], f[5], f[6]
        g = np.empty((6, w), np.int32)
        A, B, V, E, L, CI = g[0], g[1], g[2], g[3], g[4], g[5]
        T = np.empty((C, w if pixel_major else 0), np.float32)
        counts = np.zeros(C * C + 2 * bins, np.int64)
        fsums = np.zeros(C + bins)
        acc = np.zeros(4)
        clipped = 0
        for t0 in range(0, n, w):
            m = min(w, n - t0)
            if pixel_major:
                for k in range(m):
                    for c in range(C):
                        T[c, k] = P[t0 + k, c]
                X, x0 = T, 0
            else:
                X, x0 = P, start + t0
            _labels(X, y[t0 : t0 + m], x0, m, V, L, PY)
            _planes(X.view(np.int32), x0, m, S, H, Q, M, A, B)
            bad, _, cl, kl, js, ent, br = _pixels(
                S, H, Q, M, A, B, V, L, PY, KL, JS, E, CI, m, tol, log_eps, eps, bins, C
            )
            if bad:
                return False, 0
            for s in range(n_unc):  # --uncertainty: scores from M, A, H (S: scratch)
                if unc[s] == 2:
                    _fu.second_max(X, x0, m, A, S)
                unc_acc[s] += _fu.tile_cells(unc[s], m, H, M, A, V, L, S, cells[s], t0)
            clipped += cl
            acc[0] += kl
            acc[1] += js
            acc[2] += ent
            acc[3] += br
            _scatter(m, V, CI, E, L, KL, M, C, counts, fsums)
        sums[0] += acc[0]  # kl
        sums[2] += acc[1]  # js
        sums[3] += acc[0]  # ce = kl against a one-hot target
        sums[4] += acc[2]  # entropy
        sums[5] += acc[3]  # brier
        cm += counts[: C * C].reshape((C, C))
        ece_n += counts[C * C :: 2] + counts[C * C + 1 :: 2]
        ece_ok += counts[C * C + 1 :: 2]
        class_kl += fsums[:C]
        class_ce += fsums[:C]  # ce = kl against a one-hot target
        ece_conf += fsums[C:]
        for s in range(n_unc):
            _fu.scatter_cells(cells[s], n, unc_hist[s])
            unc_sum[s] += unc_acc[s]
        return True, clipped


def supported(settings, dtype) -> bool:
    """Whether the kernel covers these settings (everything else uses the NumPy path)."""
    return (
        AVAILABLE
        and settings.input_kind == "probs"
        and not settings.soft_gt
        and settings.smoothing == 0.0
        and not settings.renormalize
        and getattr(settings, "temperature", 1.0) == 1.0  # calibrated maps: NumPy path
        and not getattr(settings, "calibration_views", False)  # view sums: NumPy path
        and np.dtype(dtype) == np.float32
    )


def add_chunk(total, P: np.ndarray, y: np.ndarray, settings, tolerance: float, *,
              pixel_major: bool = False, start: int = 0) -> bool:  # fmt: skip
    """Add a float32 chunk with labels ``y`` to ``total``: class codes (``LabelSpec.codes``:
    negative where a pixel is ignored), or raw labels when ``LabelSpec.plain`` (values
    outside 0..C−1 are masked). Labels go to the kernel as int32, so that one compiled
    specialisation serves every label dtype (see ``precompile``).

    ``P`` is (C, n) class-major, or with ``pixel_major`` (n, C) as HWC maps store it. A
    class-major ``P`` may also be a whole map's (C, H·W) planes, the chunk being pixels
    ``start`` … ``start + len(y) − 1``: read in place, not copied.
    Returns False, with ``total`` untouched, when the chunk needs the NumPy path (a value
    NaN, infinite, negative, or a pixel whose probabilities do not sum to 1).
    ``total.sums[1]`` (KL(p‖q), infinite against one-hot targets) is left to the caller.
    """
    P = np.ascontiguousarray(P, dtype=np.float32)
    n = P.shape[0] if pixel_major else P.shape[1] - start
    if not np.can_cast(y.dtype, np.int32):  # wide labels: masked ones become −1 first
        C = P.shape[1] if pixel_major else P.shape[0]
        y = np.where((y >= 0) & (y < C), y, -1)
    y = np.ascontiguousarray(y, dtype=np.int32)  # one compiled specialisation for every dtype
    if pixel_major and start:
        raise ValueError("a pixel-major chunk starts at 0")
    if y.shape[0] > n:
        raise ValueError(f"{y.shape[0]} labels for {n} pixels")
    eps = settings.eps
    unc, unc_hist, unc_sum = _uncertainty_args(total, settings)
    ok, clipped = _chunk(
        P, start, y, pixel_major, TILE_HWC if pixel_major else TILE_CHW,
        np.float32(tolerance), np.float32(math.log(eps)), np.float32(eps),
        settings.ece_bins, total.sums, total.confusion, total.class_kl, total.class_ce,
        total.ece_count, total.ece_conf, total.ece_correct, unc, unc_hist, unc_sum,
    )  # fmt: skip
    if ok:
        total.n_clipped += int(clipped)
    return bool(ok)


_NO_SCORES = (np.zeros(0, np.int32), np.zeros((0, 1), np.int64), np.zeros(0))


def _uncertainty_args(total, settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score codes, histograms (S, 2·BINS), sums (S,)) for ``_chunk``: views of
    ``total``'s fields, created on first use; empty arrays without ``--uncertainty``."""
    names = getattr(settings, "uncertainty", ())
    if not names:
        return _NO_SCORES
    from .uncertainty import BINS, SCORES

    if total.unc_hist is None:
        total.unc_hist = np.zeros((len(names), 2, BINS), np.int64)
        total.unc_sum = np.zeros(len(names))
    codes = np.array([SCORES.index(s) for s in names], np.int32)
    return codes, total.unc_hist.reshape(len(names), 2 * BINS), total.unc_sum
