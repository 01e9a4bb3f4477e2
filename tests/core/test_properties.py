"""Whole images drawn as real data comes, against the independent float64 reference.

Hypothesis draws the structure — dtype (float16/32/64), layout (HWC/CHW), probabilities or
logits, hard labels (with smoothing, ignore labels anywhere) or soft targets, the ECE bin
count, the chunk size, NumPy path or compiled kernel — and a seed for the values, which mix
softmax rows, one-hot rows (exact zeros and ones), rows with exact zeros and rows whose
confidence lies exactly on an ECE bin edge. Every per-image and per-class value and every
dataset number is compared with ``tests/reference.py``, and the ECE bins pixel by pixel.

Kept away from what the reference and klseg may rightly compute differently, and from what
is being changed elsewhere: ignore values inside 0..C−1, logits whose log-softmax reaches
log eps, and n_clipped with smoothing or soft targets.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klseg_cli.core import _fast
from klseg_cli.core.calibration_views import VIEW_METRICS
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.core.stats import Stats, class_metrics, dataset_metrics, pixel_metrics
from klseg_cli.engine.image import image_stats
from klseg_cli.io.readers import PredictionMap

from ..conftest import NO_NUMBA, assert_kernel_took, recording_kernel
from ..reference import evaluate_reference

IGNORE = 255
EDGE_ROWS = (  # confidences on bin edges for 4, 10 and 15 bins (exact in float16/32/64)
    (0.5, 0.5),
    (0.75, 0.25),
    (0.25, 0.25, 0.25, 0.25),
    (0.5, 0.25, 0.25),
    (0.6, 0.4),  # float64: on the edge 9/15
    (0.2, 0.2, 0.2, 0.2, 0.2),  # float64: on the edge 3/15
    (1.0,),
)


def prob_rows(rng, n, C, dtype):
    """(n, C) rows as stored in ``dtype``: softmax, one-hot, partly zero and bin-edge rows."""
    z = rng.normal(0.0, rng.uniform(0.5, 4.0), size=(n, C))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    kind = rng.integers(0, 4, size=n)
    p[kind == 1] = 0.0  # one-hot: exact zeros and an exact one
    p[kind == 1, rng.integers(0, C)] = 1.0
    zeros = (kind == 2)[:, None] & (rng.random((n, C)) < 0.5)
    zeros[:, 0] = False  # keep one class nonzero
    p[zeros] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    for i in np.flatnonzero(kind == 3):
        edge = [r for r in EDGE_ROWS if len(r) <= C]
        row = np.zeros(C)
        row[: len(edge[i % len(edge)])] = edge[i % len(edge)]
        p[i] = rng.permutation(row)
    if dtype == np.float16:
        p = p.astype(np.float16)
        # float16 rounding moves sums by up to ~1e-3 (tolerance 1e-2): values as stored count
    return p.astype(dtype)


def logit_rows(rng, n, C, dtype):
    """(n, C) logits: log-softmax stays far above log eps (|z| ≤ 4); some rows tie exactly
    (confidence 1/2 or 1/4, exact in float32 and float64 alike)."""
    z = rng.uniform(-4.0, 4.0, size=(n, C))
    if C in (2, 4):
        z[rng.random(n) < 0.2] = 0.5
    return z.astype(dtype)


SCENARIOS = ("kernel", "hard", "smoothing", "logits", "soft", "soft-logits")
"""What is drawn first, so that each path gets its share of the examples: "kernel" is
float32/float16 probabilities against hard labels without smoothing, forced through the
compiled kernel (which must take every chunk; the NumPy path with KLSEG_NO_NUMBA set);
the others go through the NumPy path."""


@st.composite
def cases(draw):
    scenario = draw(st.sampled_from(SCENARIOS))
    soft = scenario.startswith("soft")
    dtypes = (
        [np.float32, np.float16] if scenario == "kernel" else [np.float16, np.float32, np.float64]
    )
    sizes = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3)
    return {
        "kernel": scenario == "kernel",
        "C": draw(st.integers(2, 6)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "sizes": draw(sizes),
        "dtype": draw(st.sampled_from(dtypes)),
        "layout": draw(st.sampled_from(["hwc", "chw"])),
        "logits": scenario.endswith("logits"),
        "soft": soft,
        "smoothing": draw(st.sampled_from([0.1, 0.3])) if scenario == "smoothing" else 0.0,
        "ignored": 0.0 if soft else draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])),
        "bins": draw(st.sampled_from([15, 4, 10])),
        "log_base": draw(st.sampled_from([math.e, 2.0])),
        "chunk": draw(st.integers(1, 64)),
    }


def stored(rows, h, w, layout):
    arr = rows.reshape(h, w, -1)
    return arr if layout == "hwc" else np.ascontiguousarray(arr.transpose(2, 0, 1))


def close(actual, expected, *, rel=1e-5, abs_=1e-5):
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=abs_)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples every run: no flaky CI, failures reproduce
    suppress_health_check=[HealthCheck.too_slow],
)
@given(cases())
def test_images_match_the_reference_per_pixel_class_image_and_dataset(case):
    C, dtype, layout = case["C"], case["dtype"], case["layout"]
    rng = np.random.default_rng(case["seed"])
    s = MetricSettings(
        num_classes=C,
        smoothing=case["smoothing"],
        input_kind="logits" if case["logits"] else "probs",
        log_base=case["log_base"],
        soft_gt=case["soft"],
        ece_bins=case["bins"],
    )
    truth, results = [], []
    for k, (h, w) in enumerate(case["sizes"]):
        n = h * w
        make = logit_rows if case["logits"] else prob_rows
        pred = make(rng, n, C, dtype)
        pm = PredictionMap("mem", stored(pred, h, w, layout), layout)
        if case["soft"]:
            q = prob_rows(rng, n, C, rng.choice([np.float32, np.float64]))
            target = PredictionMap("soft", stored(q, h, w, "chw"), "chw")
            truth.append((f"img{k}", pred.astype(np.float64), q.astype(np.float64)))
        else:
            labels = rng.integers(0, C, size=n)
            labels[rng.random(n) < case["ignored"]] = IGNORE
            target = labels.reshape(h, w).astype(np.uint8)
            truth.append((f"img{k}", pred.astype(np.float64), labels))
        if case["kernel"] and not NO_NUMBA:
            assert _fast.supported(s, pm.compute_dtype)
            with recording_kernel() as taken:
                got = image_stats(pm, target, s, chunk_pixels=case["chunk"], accelerate=True)
            assert_kernel_took(taken, -(-n // case["chunk"]))
        else:
            got = image_stats(pm, target, s, chunk_pixels=case["chunk"], accelerate=False)
        results.append(got)

    ref_rows, ref_classes, ref_dataset = evaluate_reference(
        truth,
        C,
        smoothing=case["smoothing"],
        logits=case["logits"],
        soft=case["soft"],
        log_base=case["log_base"],
        bins=case["bins"],
    )
    total = Stats.zeros(C, case["bins"])
    rows = []
    for k, (got, ref) in enumerate(zip(results, ref_rows)):
        np.testing.assert_array_equal(got.ece_count, ref["ece_counts"], err_msg=f"img{k} bins")
        row = pixel_metrics(got, s)
        assert got.n_valid == ref["n_valid"]
        for key, value in row.items():
            assert close(value, ref[key]), (f"img{k}", key, value, ref[key])
        if not case["soft"] and case["smoothing"] == 0.0:
            # hard targets: only the label's probability is clipped (logits: none here)
            p_y = [r[lab] for r, lab in zip(truth[k][1], truth[k][2]) if lab != IGNORE]
            expect = 0 if case["logits"] else int(np.count_nonzero(np.array(p_y) < s.eps))
            assert got.n_clipped == expect
        rows.append(row)
        total = total + got

    for got, ref in zip(class_metrics(total, s), ref_classes, strict=True):
        for key, value in ref.items():
            assert close(got[key], value), (got["class_id"], key, got[key], value)
    dataset = dataset_metrics(rows, total, s)
    views = {f"{m}_pooled" for m in VIEW_METRICS}  # opt-in (--calibration-views): NaN here
    assert dataset.keys() - views == ref_dataset.keys()
    assert all(math.isnan(dataset[k]) for k in views)
    for key, value in ref_dataset.items():
        assert close(dataset[key], value), (key, dataset[key], value)
