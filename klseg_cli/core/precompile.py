"""Fill numba's cache with the compiled kernels: ``python -m klseg_cli.core.precompile``.

The build (``setup.py``) runs it against the built package. Its own module, so that the
evaluation kernel (``_fast``) and calibrate's compiled pass (``_fast_fit``, which builds on
``_fast``) never import each other.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # by hand or by setup.py: into the package's shipped cache
    os.environ.setdefault("KLSEG_CACHE_INTO_PACKAGE", "1")

import numpy as np

from ._fast import AVAILABLE, add_chunk


def precompile() -> bool:
    """Compile the kernels (evaluation, and calibrate's compiled pass) for the signatures
    klseg calls them with, into numba's cache (``CACHE_DIR``). Run when the package is built
    (``setup.py``), so a fresh install loads machine code instead of spending seconds
    compiling on its first large map; numba checks the cache against each source file's
    contents, its own version and the CPU, and compiles afresh if any differs. Returns
    False without numba."""
    if not AVAILABLE:
        return False
    from .metrics import MetricSettings
    from .stats import Stats

    settings = MetricSettings(num_classes=3)
    total = Stats.zeros(3, settings.ece_bins)
    P = np.full((3, 4), 1 / 3, dtype=np.float32)
    y = np.array([0, 1, 2, 255], dtype=np.uint8)
    add_chunk(total, P, y, settings, 1e-3)
    add_chunk(total, np.ascontiguousarray(P.T), y, settings, 1e-3, pixel_major=True)
    scored = MetricSettings(num_classes=3, uncertainty=("entropy", "margin"))  # same types
    add_chunk(Stats.zeros(3, 15), P, y, scored, 1e-3)
    add_chunk(Stats.zeros(3, 15), np.ascontiguousarray(P.T), y, scored, 1e-3, pixel_major=True)
    from . import _fast_fit  # klseg calibrate's compiled pass and class-wise bins

    codes = settings.labels.codes(y)
    _fast_fit.chunk_sums(P, codes, 1.0, settings, 1e-3)
    _fast_fit.chunk_sums(np.ascontiguousarray(P.T), codes, 1.0, settings, 1e-3, pixel_major=True)
    bins = np.zeros((3, 15), np.int64)
    _fast_fit.classwise_sums(P, codes, 15, bins, np.zeros((3, 15)), np.zeros((3, 15), np.int64))
    return True


if __name__ == "__main__":  # python -m klseg_cli.core.precompile: fill the compiled cache
    print("kernel compiled" if precompile() else "numba is not installed: nothing to compile")
