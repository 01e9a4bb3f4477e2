"""Values exactly on the contract's edges, through the NumPy path and the compiled kernel.

ECE bins are right-closed, ((b−1)/B, b/B], so a confidence exactly on an edge belongs to
the lower bin and 1.0 to the last (DESIGN §2); per-pixel KL is clamped at 0, and pixels
whose probabilities sum slightly above 1 (inside the sum tolerance) must not make it
negative. Random data almost never hits these cases, so they are built here on purpose.
"""

import math

import numpy as np
import pytest

from klseg_cli.core.metrics import MetricSettings, ece_bin_index, pixel_terms
from klseg_cli.core.stats import pixel_metrics
from klseg_cli.engine.image import image_stats
from klseg_cli.errors import ProbabilityError
from klseg_cli.io.readers import PredictionMap

from ..conftest import assert_kernel_took, recording_kernel
from ..reference import ece as reference_ece
from ..reference import ece_bin_counts

PATHS = ["numpy", "kernel"]


def as_map(p, layout="hwc"):
    """(n, C) rows as a 1 × n image."""
    arr = p.reshape(1, *p.shape)
    if layout == "chw":
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
    return PredictionMap("mem", arr, layout)


def stats(p, labels, s, path, layout="hwc"):
    """image_stats of (n, C) rows as a 1 × n image; ``path="kernel"`` forces the kernel and
    checks that it took the chunk."""
    pm = as_map(p, layout)
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
    # a confidence just above 1 is in the last ECE bin too, not past it
    assert got.ece_count[-1] == 6 and got.ece_count.sum() == 12


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


# --- eps: a probability equal to eps is not clipped ----------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_n_clipped_counts_probabilities_below_eps_only(path, dtype):
    if path == "kernel" and dtype != np.float32:
        pytest.skip("the kernel takes float32 maps only")
    eps = dtype(1e-7)  # as the map's dtype holds it: max(p, eps) leaves it unchanged
    below = np.nextafter(eps, dtype(0))
    p = np.array([[eps, 1 - eps], [below, 1 - below], [0.0, 1.0], [0.5, 0.5]], dtype=dtype)
    got = stats(p, [0, 0, 0, 1], MetricSettings(num_classes=2), path)
    assert got.n_clipped == 2  # below eps and 0; not eps itself, not 0.5


# --- the sum check: its tolerance, and values that are not probabilities -----------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "dtype,row,accepted",
    [
        (np.float32, (0.5, 0.5, 0.0009), True),  # sums to 1.0009: inside 1e-3
        (np.float32, (0.5, 0.5, 0.0012), False),  # 1.0012
        (np.float32, (0.5, 0.4988, 0.0), False),  # 0.9988
        (np.float16, (0.334, 0.334, 0.336), True),  # 1.0039: inside float16's 1e-2
        (np.float32, (0.33398438, 0.33398438, 0.33593750), False),  # the same values, float32
        (np.float16, (0.5, 0.5, 0.012), False),  # 1.012
    ],
)
def test_sum_tolerance(path, dtype, row, accepted):
    p = rows((0.2, 0.3, 0.5), row, (1.0,), C=3).astype(dtype)
    s = MetricSettings(num_classes=3)
    if accepted:
        assert stats(p, [0, 1, 2], s, path).n_valid == 3
        return
    with pytest.raises(ProbabilityError, match="do not sum to 1"):
        if path == "numpy":
            stats(p, [0, 1, 2], s, path)
        else:
            with recording_kernel() as taken:
                stats(p, [0, 1, 2], s, path)
    if path == "kernel":
        assert taken == [False]  # the kernel refused the chunk; the NumPy path said why


@pytest.mark.parametrize("path", PATHS)
def test_small_negative_values_are_refused_even_when_rows_sum_to_one(path):
    p = rows((0.2, 0.8), (0.5, 0.5005, -0.0005), C=3).astype(np.float32)
    with pytest.raises(ProbabilityError, match=r"values range over \[-0.0005"):
        stats(p, [0, 1], MetricSettings(num_classes=3), path)


@pytest.mark.parametrize("path", PATHS)
def test_a_value_just_above_one_is_not_called_logits(path):
    """1.0005 is a probability (inside the tolerance): a chunk refused for another pixel
    says that pixel's sum is off, and does not suggest --input logits."""
    p = rows((1.0005,), (0.5, 0.3, 0.1), C=3).astype(np.float32)
    with pytest.raises(ProbabilityError, match="do not sum to 1") as info:
        stats(p, [0, 1], MetricSettings(num_classes=3), path)
    assert "logits" not in str(info.value)


def test_soft_target_values_just_above_one_are_accepted():
    """Soft targets are checked on their own (no prediction pre-check): 1.0005 is inside
    the tolerance there too, and its KL is clamped at 0 against the same prediction."""
    q = rows((1.0005,), (0.25, 0.75), C=3).astype(np.float32)
    s = MetricSettings(num_classes=3, soft_gt=True)
    got = image_stats(as_map(q), as_map(q.copy()), s)
    assert got.n_valid == 2 and got.sums[0] == 0.0  # Σ kl, clamped at 0 per pixel


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_divergences_are_never_negative_per_pixel(rng, dtype):
    """KL, reverse KL and JS are ≥ 0 (DESIGN §2), so the per-pixel maps a heatmap draws
    never dip below 0: rounding makes p = q give −1e-16 … −1e-8 before the clamps."""
    C, n = 3, 20000
    z = rng.random((C, n)) ** 4
    y = rng.integers(0, C, n)
    near = np.arange(n) < n // 2  # near one-hot: the JS of a hard label cancels to ~1e-15
    z[:, near] *= 1e-7
    z[y[near], np.flatnonzero(near)] = 0.0
    z[y[near], np.flatnonzero(near)] = 1.0 - z[:, near].sum(axis=0)
    P = (z / z.sum(axis=0)).astype(dtype)
    for target, s in (
        (y, MetricSettings(num_classes=C)),
        (y, MetricSettings(num_classes=C, smoothing=0.1)),
        (P.copy(), MetricSettings(num_classes=C, soft_gt=True)),
    ):
        t = pixel_terms(P, target, s, tolerance=1e-3)
        for name in ("kl", "kl_reverse", "js", "ce"):
            value = getattr(t, name)
            if value is not None:
                assert value.min() >= 0.0, (name, s)
        assert t.js.max() <= math.log(2.0)
