"""The compiled kernel's failure-detection step (``--uncertainty``, DESIGN §11).

Called by ``_fast._chunk`` for each tile, after its per-pixel loops: the kernel's own
per-pixel maximum ``M``, argmax ``A`` and Σ p log p ``H`` give ``maxprob`` and ``entropy``
without another pass over the map; ``margin`` adds one compare-only pass over the classes
for the second largest value. Each valid pixel's histogram cell (bin + BINS·[wrong], the
bins of ``uncertainty.bin_index``) is written to a per-chunk array and scattered into the
totals only once the whole chunk has passed the kernel's checks, so that a refused chunk
leaves no trace.
"""

from __future__ import annotations

import numpy as np

from ._jit import AVAILABLE, FASTMATH
from .uncertainty import _OFFSET, _SHIFT, BINS

if AVAILABLE:
    import numba

    _i32 = np.int32
    _f32 = np.float32

    @numba.njit(fastmath=FASTMATH, error_model="numpy", cache=True)
    def second_max(X, x0, m, A, U):
        """U[i] = the largest value of pixel x0 + i over the classes other than A[i]."""
        C = X.shape[0]
        u0 = np.uint64(x0)
        for i in range(m):
            U[i] = _f32(0.0)
        for c in range(C):
            for i in range(m):
                x = X[np.uint64(c), u0 + np.uint64(i)]
                other = A[i] != _i32(c)
                U[i] = x if (other & (x > U[i])) else U[i]

    @numba.njit(fastmath=FASTMATH, error_model="numpy", cache=True)
    def tile_cells(code, m, H, M, A, V, L, U, cells, t0):
        """Score and histogram cell of the first m pixels of a tile; returns Σ score.

        ``code``: 0 maxprob, 1 entropy, 2 margin (``U`` holds the second maximum then).
        ``cells[t0 + i]``: bin + BINS·[wrong], −1 for an ignored pixel.
        """
        for i in range(m):
            if code == 0:
                u = _f32(1.0) - M[i]
            elif code == 1:
                u = -H[i]
            else:
                u = _f32(1.0) - (M[i] - U[i])
            U[i] = u if u > _f32(0.0) else _f32(0.0)
        Ui = U.view(np.int32)
        total = 0.0
        for i in range(m):
            b = _i32(_i32(Ui[i] >> _i32(_SHIFT)) - _i32(_OFFSET))
            b = b if b > _i32(1) else _i32(1)
            b = b if b < _i32(BINS - 1) else _i32(BINS - 1)
            b = b if Ui[i] != _i32(0) else _i32(0)
            cell = _i32(b + (_i32(BINS) if A[i] != L[i] else _i32(0)))
            cells[t0 + i] = cell if V[i] != 0 else _i32(-1)
            total += np.float64(U[i]) if V[i] != 0 else 0.0
        return total

    @numba.njit(error_model="numpy", cache=True)
    def scatter_cells(cells, n, hist):
        """hist[cell] += 1 for the first n cells that are not −1."""
        for i in range(n):
            c = cells[i]
            if c >= 0:
                hist[np.uint64(c)] += 1
