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
