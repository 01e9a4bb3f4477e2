import os
from contextlib import contextmanager

import numpy as np
import pytest


def random_probs(rng, n, C, *, saturate=0.0, dtype=np.float32, sharp=3.0):
    """(n, C) softmax rows; a fraction ``saturate`` of rows is exactly one-hot (0 and 1)."""
    z = rng.normal(0, sharp, size=(n, C))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if saturate:
        rows = rng.random(n) < saturate
        hot = rng.integers(0, C, size=n)
        p[rows] = 0.0
        p[rows, hot[rows]] = 1.0
    return p.astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


NO_NUMBA = bool(os.environ.get("KLSEG_NO_NUMBA"))
"""Set KLSEG_NO_NUMBA=1 to run the suite without the compiled kernel; otherwise numba must
import (CI installs the ``fast`` extra) and the kernel tests run, never skip silently."""


@contextmanager
def recording_kernel():
    """Record what every ``_fast.add_chunk`` call returns (True: the kernel took the chunk).

    A kernel test must know that the kernel computed its chunks: one that silently went
    back to the NumPy path would compare the NumPy path with itself. Patching the module
    attribute catches every caller that looks it up at call time (threads included); a
    caller that bound it earlier records nothing, so ``assert_kernel_took`` fails loudly.
    """
    from klseg_cli.core import _fast

    if not _fast.AVAILABLE:
        if NO_NUMBA:
            pytest.skip("KLSEG_NO_NUMBA is set")
        pytest.fail("numba does not import: pip install -e '.[fast]' (or set KLSEG_NO_NUMBA=1)")
    taken: list[bool] = []
    real = _fast.add_chunk

    def add_chunk(*args, **kwargs):
        ok = real(*args, **kwargs)
        taken.append(bool(ok))
        return ok

    _fast.add_chunk = add_chunk
    try:
        yield taken
    finally:
        _fast.add_chunk = real


def assert_kernel_took(taken: list[bool], n_chunks: int | None = None) -> None:
    """The kernel was called for every chunk (``n_chunks`` of them, if given) and took each."""
    assert taken, "the kernel was never called: every chunk went to the NumPy path"
    if n_chunks is not None:
        assert len(taken) == n_chunks, f"the kernel saw {len(taken)} of {n_chunks} chunks"
    assert all(taken), f"the kernel refused {taken.count(False)} of {len(taken)} chunks"
