"""The optional compiled kernel (klseg[fast]) gives the NumPy path's numbers."""

import numpy as np
import pytest

from klseg_cli import _fast
from klseg_cli.evaluation import image_stats
from klseg_cli.metrics import MetricSettings
from klseg_cli.readers import PredictionMap

from .conftest import random_probs

pytestmark = pytest.mark.skipif(not _fast.AVAILABLE, reason="numba is not installed")


def both(pm, labels, s, chunk=4096):
    ref = image_stats(pm, labels, s, chunk_pixels=chunk, accelerate=False)
    fast = image_stats(pm, labels, s, chunk_pixels=chunk, accelerate=True)
    return ref, fast


def assert_equivalent(ref, fast):
    np.testing.assert_array_equal(fast.confusion, ref.confusion)
    np.testing.assert_array_equal(fast.ece_count, ref.ece_count)
    np.testing.assert_array_equal(fast.ece_correct, ref.ece_correct)
    assert fast.n_clipped == ref.n_clipped
    np.testing.assert_allclose(fast.sums, ref.sums, rtol=2e-7, equal_nan=True)
    np.testing.assert_allclose(fast.class_kl, ref.class_kl, rtol=2e-7)
    np.testing.assert_allclose(fast.class_ce, ref.class_ce, rtol=2e-7)
    np.testing.assert_allclose(fast.ece_conf, ref.ece_conf, rtol=1e-12)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("C", [2, 5, 19])
def test_kernel_equals_numpy_path(rng, layout, C):
    h, w = 37, 61
    p = random_probs(rng, h * w, C, saturate=0.3).reshape(h, w, C)
    p[0, :5] = 0.0
    p[0, :5, :2] = 0.5  # ties go to the lower class
    p[1, :3] = 0.0
    p[1, :3, -1] = 1.0  # saturated: exact 0 and 1, clipped at eps
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    labels[2] = 255
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    ref, fast = both(PredictionMap("mem", arr, layout), labels, MetricSettings(num_classes=C))
    assert ref.n_clipped > 0
    assert_equivalent(ref, fast)


def test_log_is_accurate():
    x = np.concatenate([np.geomspace(1e-30, 1, 20001), [0.0, 1.0, 0.5, 0.999999]]).astype(
        np.float32
    )
    got = np.array([_fast._log_bits(np.int32(b)) for b in x.view(np.int32)], dtype=np.float64)
    pos = x > 0
    np.testing.assert_allclose(got[pos], np.log(x[pos].astype(np.float64)), rtol=2e-7, atol=2e-7)
    assert np.isfinite(got[~pos]).all() and (got[~pos] < -80).all()


def test_bad_chunks_fall_back_to_the_numpy_diagnosis(rng):
    from klseg_cli.errors import ProbabilityError

    p = random_probs(rng, 100, 3).reshape(10, 10, 3)
    labels = np.zeros((10, 10), np.uint8)
    s = MetricSettings(num_classes=3)
    for bad, match in ((np.nan, "NaN"), (-0.5, "logits"), (1.5, "logits")):
        q = p.copy()
        q[3, 3, 1] = bad
        with pytest.raises(ProbabilityError, match=match):
            image_stats(PredictionMap("mem", q, "hwc"), labels, s)
    assert (
        _fast.chunk_stats(
            np.ascontiguousarray(p.reshape(-1, 3).T * 0.5), labels.reshape(-1), s, 1e-3
        )
        is None
    )


def test_out_of_scope_settings_use_numpy():
    assert _fast.supported(MetricSettings(num_classes=3), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3, smoothing=0.1), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3, input_kind="logits"), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3), np.float64)
