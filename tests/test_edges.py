"""Values exactly on the contract's edges, through the NumPy path and the compiled kernel.

ECE bins are right-closed, ((b−1)/B, b/B], so a confidence exactly on an edge belongs to
the lower bin and 1.0 to the last (DESIGN §2); per-pixel KL is clamped at 0, and pixels
whose probabilities sum slightly above 1 (inside the sum tolerance) must not make it
negative. Random data almost never hits these cases, so they are built here on purpose.
"""

import math

import numpy as np
import pytest

from klseg_cli.evaluation import image_stats
from klseg_cli.metrics import MetricSettings, ece_bin_index, pixel_terms
from klseg_cli.readers import PredictionMap
from klseg_cli.stats import pixel_metrics

from .conftest import assert_kernel_took, recording_kernel
from .reference import ece as reference_ece
from .reference import ece_bin_counts

PATHS = ["numpy", "kernel"]


def stats(p, labels, s, path, layout="hwc"):
    """image_stats of (n, C) rows as a 1 × n image; ``path="kernel"`` forces the kernel and
    checks that it took the chunk."""
    arr = p.reshape(1, *p.shape)
    if layout == "chw":
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
    pm = PredictionMap("mem", arr, layout)
    lab = np.asarray(labels, dtype=np.uint8).reshape(1, -1)
    if path == "numpy":
        return image_stats(pm, lab, s, accelerate=False)
    with recording_kernel() as taken:
        out = image_stats(pm, lab, s, accelerate=True)
    assert_kernel_took(taken, 1)
    return out


def rows(*confidences_and_rest, C):
    """One pixel per tuple of leading probabilities, the rest of C classes 0."""
    out = np.zeros((len(confidences_and_rest), C))
    for i, head in enumerate(confidences_and_rest):
        out[i, : len(head)] = head
    return out


# float64 edges: b/15 as written rounds to the same double as the confidence, so it is on
# the edge and lies in the lower bin: 0.2 → bin 2 (0-based), not 3.
EDGES_F64_15 = (
    [(0.2,) * 5, (0.6, 0.4), (0.4, 0.3, 0.3), (1 / 3,) * 3, (1.0,), (0.8, 0.2)],
    [2, 8, 5, 4, 14, 11],
)
# float32 edges exist only where b/B is a binary fraction: B = 4 and B = 10
EDGES_F32_4 = ([(0.75, 0.25), (0.25,) * 4, (0.5, 0.5), (1.0,), (0.5, 0.25, 0.25)], [2, 0, 1, 3, 1])
EDGES_F32_10 = ([(0.5, 0.5), (0.75, 0.25), (0.25,) * 4, (1.0,), (0.3, 0.7)], [4, 7, 2, 9, 6])


@pytest.mark.parametrize(
    "dtype,bins,case",
    [(np.float64, 15, EDGES_F64_15), (np.float32, 4, EDGES_F32_4), (np.float32, 10, EDGES_F32_10)],
)
def test_ece_bin_index_puts_edges_in_the_lower_bin(dtype, bins, case):
    heads, expected = case
    conf = np.array([max(h) for h in heads], dtype=dtype)
    np.testing.assert_array_equal(ece_bin_index(conf, bins), expected)
    np.testing.assert_array_equal(ece_bin_counts(conf, bins), np.bincount(expected, minlength=bins))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "dtype,bins,case",
    [(np.float64, 15, EDGES_F64_15), (np.float32, 4, EDGES_F32_4), (np.float32, 10, EDGES_F32_10)],
)
def test_confidences_on_bin_edges(path, dtype, bins, case):
    if path == "kernel" and dtype != np.float32:
        pytest.skip("the kernel takes float32 maps only")
    heads, expected = case
    p = rows(*heads, C=6).astype(dtype)
    labels = np.arange(len(heads)) % 2  # some right, some wrong
    s = MetricSettings(num_classes=6, ece_bins=bins)
    got = stats(p, labels, s, path)
    np.testing.assert_array_equal(got.ece_count, np.bincount(expected, minlength=bins))
    conf = p.max(axis=1).astype(np.float64)
    pred = p.argmax(axis=1)
    correct = (pred == labels).astype(float)
    for b in range(bins):
        sel = np.asarray(expected) == b
        assert got.ece_correct[b] == int(correct[sel].sum())
        assert math.isclose(got.ece_conf[b], conf[sel].sum(), rel_tol=1e-12)
    assert math.isclose(
        pixel_metrics(got, s)["ece"], reference_ece(conf, correct, bins), rel_tol=1e-9
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_confidence_one_is_in_the_last_bin(path, layout):
    p = rows((1.0,), (0.0, 1.0), (0.5, 0.5), C=3).astype(np.float32)
    s = MetricSettings(num_classes=3)
    got = stats(p, [0, 0, 0], s, path, layout)
    assert got.ece_count[14] == 2 and got.ece_correct[14] == 1
    assert got.ece_count[7] == 1  # 0.5 · 15 = 7.5: bin (7/15, 8/15]


# --- KL (and CE) clamped at 0 -------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_kl_is_clamped_where_probabilities_sum_above_one(path, dtype, layout):
    """p_label = 1.0005 sums to within the 1e-3 tolerance (1.001 for float16's 1e-2):
    −log p_label < 0, but KL (= CE against a hard label) is clamped at 0, on both paths."""
    C = 4
    p = np.zeros((12, C))
    p[:6, 0] = 1.0005  # class 0: every pixel sums slightly above 1
    p[6:, 1] = 0.7  # class 1: an ordinary pixel, KL = −log 0.7
    p[6:, 2] = 0.3
    p = p.astype(dtype)
    labels = np.array([0] * 6 + [1] * 6)
    s = MetricSettings(num_classes=C)
    got = stats(p, labels, s, path, layout)
    p_y = float(np.float32(p[0, 0]))
    assert p_y > 1.0  # the case under test
    assert got.class_kl[0] == 0.0 and got.class_ce[0] == 0.0
    expect = 6 * -math.log(float(np.float32(p[6, 1])))
    assert math.isclose(got.class_kl[1], expect, rel_tol=1e-6)
    assert math.isclose(got.class_ce[1], expect, rel_tol=1e-6)
    assert math.isclose(got.sums[0], expect, rel_tol=1e-6)  # kl
    assert math.isclose(got.sums[3], expect, rel_tol=1e-6)  # ce
    metrics = pixel_metrics(got, s)
    assert metrics["kl"] >= 0 and metrics["ce"] >= 0


def test_kl_is_clamped_per_pixel_in_the_numpy_core():
    """Every target kind: forward KL of p = 1.0005·q and reverse KL of p = 0.9995·q are
    −5e-4 in exact arithmetic on these (unnormalised) inputs; both are clamped to 0."""
    C = 3
    s_hard = MetricSettings(num_classes=C)
    P = np.zeros((C, 2), np.float32)
    P[0] = 1.0005
    t = pixel_terms(P, np.array([0, 0]), s_hard, tolerance=1e-3)
    np.testing.assert_array_equal(t.kl, 0.0)
    np.testing.assert_array_equal(t.ce, 0.0)  # CE = KL against a hard label

    s = MetricSettings(num_classes=C, smoothing=0.3)
    q = np.full(C, s.q_lo)
    q[1] = s.q_hi
    for scale, field in ((1.0005, "kl"), (0.9995, "kl_reverse")):
        P = np.tile((q * scale)[:, None], (1, 3)).astype(np.float64)
        t = pixel_terms(P, np.array([1, 1, 1]), s, tolerance=1e-3)
        np.testing.assert_array_equal(getattr(t, field), 0.0, err_msg=f"smoothing {field}")
        Q = np.tile(q[:, None], (1, 3))
        soft = MetricSettings(num_classes=C, soft_gt=True)
        t = pixel_terms(P, Q, soft, tolerance=1e-3)
        np.testing.assert_array_equal(getattr(t, field), 0.0, err_msg=f"soft {field}")
