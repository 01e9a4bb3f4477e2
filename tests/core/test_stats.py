"""Sums merge by addition: chunked == one-shot, any order, any grouping."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from klseg_cli.core.metrics import MetricSettings
from klseg_cli.core.stats import Stats, pixel_metrics
from klseg_cli.engine.image import iter_terms
from klseg_cli.io.readers import PredictionMap

from ..conftest import random_probs


def image(seed, h, w, C, layout):
    rng = np.random.default_rng(seed)
    p = random_probs(rng, h * w, C, saturate=0.2).reshape(h, w, C)
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    labels[rng.random((h, w)) < 0.1] = 255
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    return PredictionMap("mem", arr, layout), labels


def stats_of(pm, labels, s, chunk):
    total = Stats.zeros(s.num_classes, s.ece_bins)
    for _, _, _, terms in iter_terms(pm, labels, s, chunk_pixels=chunk):
        total = total + Stats.from_terms(terms, s)
    return total


def assert_same(a: Stats, b: Stats, rtol=1e-12):
    np.testing.assert_array_equal(a.confusion, b.confusion)
    np.testing.assert_array_equal(a.ece_count, b.ece_count)
    np.testing.assert_array_equal(a.ece_correct, b.ece_correct)
    assert a.n_clipped == b.n_clipped
    for x, y in (
        (a.sums, b.sums),
        (a.class_kl, b.class_kl),
        (a.class_ce, b.class_ce),
        (a.ece_conf, b.ece_conf),
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    C=st.integers(2, 7),
    layout=st.sampled_from(["hwc", "chw"]),
    chunk=st.integers(1, 500),
    smoothing=st.sampled_from([0.0, 0.1]),
)
def test_any_chunk_size_gives_the_same_sums(seed, h, w, C, layout, chunk, smoothing):
    pm, labels = image(seed, h, w, C, layout)
    s = MetricSettings(num_classes=C, smoothing=smoothing)
    assert_same(stats_of(pm, labels, s, chunk), stats_of(pm, labels, s, h * w))


@settings(max_examples=30, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3),
    order=st.permutations([0, 1, 2]),
)
def test_merge_is_associative_and_order_free(seeds, order):
    s = MetricSettings(num_classes=4)
    parts = [stats_of(*image(sd, 9, 7, 4, "hwc"), s, 64) for sd in seeds]
    a, b, c = parts
    assert_same((a + b) + c, a + (b + c))
    x, y, z = (parts[i] for i in order)
    assert_same(a + b + c, x + y + z)
    m1, m2 = pixel_metrics(a + b + c, s), pixel_metrics(x + y + z, s)
    for key in m1:
        assert np.isclose(m1[key], m2[key], rtol=1e-12, equal_nan=True), key


def test_stats_serialise_to_plain_data():
    s = MetricSettings(num_classes=3)
    st_ = stats_of(*image(1, 5, 6, 3, "chw"), s, 7)
    import json

    again = Stats.from_dict(json.loads(json.dumps(st_.to_dict(), allow_nan=True)))
    assert_same(st_, again, rtol=0)


def test_results_are_identical_for_any_jobs():
    from pathlib import Path

    from klseg_cli import evaluate

    sample = Path(__file__).resolve().parents[2] / "sample_data"
    args = (sample / "predictions", sample / "ground_truth")
    from klseg_cli.render.report import summary_json

    one, two, three = (summary_json(evaluate(*args, jobs=j).summary()) for j in (1, 2, 3))
    assert one == two == three  # the same text: the same numbers to the last bit
