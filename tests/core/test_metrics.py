"""The per-pixel core against an independent float64 reference, plus its properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp, rel_entr
from scipy.stats import entropy as scipy_entropy

from klseg_cli.core.metrics import MetricSettings, argmax_classes, ece_bin_index, pixel_terms
from klseg_cli.errors import ProbabilityError

from ..conftest import random_probs
from ..reference import hard_targets, pixel_values

RTOL = 2e-5


def terms_for(p, target, **kw):
    """pixel_terms on (n, C) rows: klseg works class-major."""
    C = p.shape[1]
    s = MetricSettings(num_classes=C, **kw)
    P = np.ascontiguousarray(p.T)
    tgt = np.ascontiguousarray(target.T) if s.soft_gt else target
    return pixel_terms(P, tgt, s, tolerance=None), s


def assert_close(actual, expected, atol=2e-6):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hard_labels_match_reference(rng, smoothing, dtype):
    p = random_probs(rng, 4000, 7, saturate=0.2, dtype=dtype)
    y = rng.integers(0, 7, size=4000)
    terms, _ = terms_for(p, y, smoothing=smoothing)
    ref = pixel_values(p, hard_targets(y, 7, smoothing))
    for name in ("kl", "js", "ce", "entropy", "brier", "confidence"):
        assert_close(getattr(terms, name), ref[name])
    np.testing.assert_array_equal(terms.pred, ref["pred"])
    if smoothing == 0.0:
        assert terms.kl_reverse is None  # infinite against one-hot targets: not computed
    else:
        assert_close(terms.kl_reverse, ref["kl_reverse"])


def test_kl_against_scipy_per_pixel(rng):
    """A slow per-pixel loop with scipy.stats.entropy (KL when given two distributions)."""
    p = random_probs(rng, 300, 5, dtype=np.float64, sharp=1.0)
    assert p.min() > 1e-7  # scipy normalises its inputs, so keep clipping out of this one
    y = rng.integers(0, 5, size=300)
    eps = 0.05
    terms, _ = terms_for(p, y, smoothing=eps)
    q = hard_targets(y, 5, eps)
    for i in range(300):
        assert math.isclose(terms.kl[i], scipy_entropy(q[i], p[i]), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(terms.kl_reverse[i], scipy_entropy(p[i], q[i]), rel_tol=1e-9)
        assert math.isclose(terms.entropy[i], scipy_entropy(p[i]), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(
            terms.ce[i], scipy_entropy(q[i]) + scipy_entropy(q[i], p[i]), rel_tol=1e-9
        )


def test_soft_targets_match_reference(rng):
    p = random_probs(rng, 3000, 6, saturate=0.1, dtype=np.float64)
    q = random_probs(rng, 3000, 6, saturate=0.3, dtype=np.float64)
    terms, _ = terms_for(p, q, soft_gt=True)
    ref = pixel_values(p, q)
    for name in ("kl", "js", "ce", "entropy", "brier"):
        assert_close(getattr(terms, name), ref[name])
    # KL(p‖q) is infinite where q = 0 < p: klseg keeps it infinite instead of clipping
    finite = np.isfinite(ref["kl_reverse"])
    assert not finite.all()
    assert np.isinf(terms.kl_reverse[~finite]).all()
    assert_close(terms.kl_reverse[finite], ref["kl_reverse"][finite])


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_logits_use_stable_log_softmax(rng, smoothing):
    z = rng.normal(0, 30, size=(2000, 5))  # large logits: naive softmax would overflow/clip
    y = rng.integers(0, 5, size=2000)
    terms, _ = terms_for(z, y, smoothing=smoothing, input_kind="logits")
    ref = pixel_values(z, hard_targets(y, 5, smoothing), logits=True)
    for name in ("kl", "ce", "entropy", "brier", "js"):
        assert_close(getattr(terms, name), ref[name], atol=1e-4)
    # log p̃ = max(log-softmax, log eps), as for probabilities (DESIGN §2), and counted
    logp = z - logsumexp(z, axis=1, keepdims=True)
    entering = logp if smoothing else logp[np.arange(y.size), y][:, None]
    assert terms.n_clipped == int((entering < math.log(1e-7)).sum()) > 0
    assert terms.ce.max() <= -math.log(1e-7) * (1 + 1e-6)


def test_logits_score_like_their_probabilities(rng):
    """Regression (#10): ±1000 logits gave 341 nats where the same model's probabilities
    gave 12.4; logits and their softmax must give the same numbers."""
    z = np.where(rng.random((3000, 4)) < 0.5, 1000.0, -1000.0)
    y = rng.integers(0, 4, size=3000)
    p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    t_logits, _ = terms_for(z, y, input_kind="logits")
    t_probs, _ = terms_for(p, y)
    for name in ("kl", "ce", "js", "brier", "entropy"):
        assert_close(getattr(t_logits, name), getattr(t_probs, name), atol=1e-5)
    assert t_logits.n_clipped == t_probs.n_clipped > 0


def test_eps_clips_and_counts(rng):
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1e-9, 1 - 1e-9, 0.0]])
    y = np.array([1, 2, 0])
    terms, _ = terms_for(p, y, eps=1e-7)
    assert terms.n_clipped == 3
    np.testing.assert_allclose(terms.kl, [-math.log(1e-7)] * 3)


def test_eps_does_not_depend_on_dtype(rng):
    p = random_probs(rng, 500, 4, saturate=0.5, dtype=np.float64)
    y = rng.integers(0, 4, size=500)
    t16, _ = terms_for(p.astype(np.float16).astype(np.float64), y)
    t64, _ = terms_for(p.astype(np.float16).astype(np.float32), y)
    assert_close(t16.kl, t64.kl)
    assert t16.n_clipped == t64.n_clipped > 0


def test_ties_go_to_lowest_class():
    P = np.array([[0.4, 0.2, 0.5], [0.4, 0.4, 0.25], [0.2, 0.4, 0.25]], dtype=np.float32)
    conf, pred = argmax_classes(P)
    np.testing.assert_array_equal(pred, [0, 1, 0])
    np.testing.assert_allclose(conf, [0.4, 0.4, 0.5])


def test_ece_bins_are_right_closed():
    conf = np.array([1 / 15, np.nextafter(np.float32(1 / 15), 1), 1.0, 0.2], dtype=np.float32)
    idx = ece_bin_index(conf, 15)
    # float32(1/15) lies just above or below 1/15: its exact value decides, as in float64
    assert idx[0] == (0 if float(conf[0]) <= 1 / 15 else 1)
    assert idx[1] == 1 and idx[2] == 14
    assert idx[3] == (2 if float(conf[3]) <= 0.2 else 3)


def test_invalid_probabilities_are_refused(rng):
    s = MetricSettings(num_classes=3)
    P = np.array([[0.2, 0.5], [0.3, 0.5], [0.5, 0.1]], dtype=np.float32)
    with pytest.raises(ProbabilityError, match="do not sum to 1"):
        pixel_terms(P, np.array([0, 1]), s, tolerance=1e-3)
    with pytest.raises(ProbabilityError, match="logits"):
        pixel_terms(P * 10 - 3, np.array([0, 1]), s, tolerance=1e-3)
    P[0, 0] = np.nan
    with pytest.raises(ProbabilityError, match="NaN"):
        pixel_terms(P, np.array([0, 1]), s, tolerance=1e-3)


# --- properties ---------------------------------------------------------------------------

classes = st.integers(min_value=2, max_value=8)


def _distributions(draw, n, C):
    raw = draw(hnp.arrays(np.float64, (n, C), elements=st.floats(0, 1)))
    zero_rows = raw.sum(axis=1) == 0
    raw[zero_rows, 0] = 1.0
    return raw / raw.sum(axis=1, keepdims=True)


@st.composite
def prob_rows(draw, min_pixels=1):
    C = draw(classes)
    n = draw(st.integers(min_value=min_pixels, max_value=40))
    p = _distributions(draw, n, C)
    y = draw(hnp.arrays(np.int64, n, elements=st.integers(0, C - 1)))
    return p, y


@st.composite
def prob_pairs(draw):
    """Two (n, C) maps of the same shape: every example is used, none discarded."""
    C = draw(classes)
    n = draw(st.integers(min_value=1, max_value=40))
    return _distributions(draw, n, C), _distributions(draw, n, C)


@settings(max_examples=60, deadline=None)
@given(prob_rows(), st.sampled_from([0.0, 0.05, 0.3]))
def test_properties_hard(data, smoothing):
    p, y = data
    terms, _ = terms_for(p, y, smoothing=smoothing)
    assert (terms.kl >= 0).all()
    assert (terms.js >= 0).all() and (terms.js <= math.log(2) + 1e-12).all()
    assert (terms.brier >= -1e-12).all() and (terms.brier <= 2 + 1e-12).all()
    q = hard_targets(y, p.shape[1], smoothing)
    h_q = -(q * np.log(np.where(q > 0, q, 1))).sum(axis=1)
    clipped = (p < 1e-7).any(axis=1)
    np.testing.assert_allclose(terms.ce[~clipped], (h_q + terms.kl)[~clipped], atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(prob_rows())
def test_kl_of_a_distribution_with_itself_is_zero(data):
    p, _ = data
    terms, _ = terms_for(p, p, soft_gt=True)
    exact = ~((p > 0) & (p < 1e-7)).any(axis=1)  # clipping acts only below eps
    np.testing.assert_allclose(terms.kl[exact], 0.0, atol=1e-9)
    np.testing.assert_allclose(terms.kl_reverse, 0.0, atol=1e-9)
    np.testing.assert_allclose(terms.js, 0.0, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(prob_pairs())
def test_kl_is_not_symmetric_but_js_is(pair):
    p, q = pair
    forward, _ = terms_for(p, q, soft_gt=True)
    backward, _ = terms_for(q, p, soft_gt=True)
    np.testing.assert_allclose(forward.js, backward.js, atol=1e-9)
    ref = rel_entr(q, np.maximum(p, 1e-7)).sum(axis=1)
    exact = (p >= 1e-7).all(axis=1) | (p == 0).all(axis=1)
    np.testing.assert_allclose(forward.kl[exact], np.maximum(ref[exact], 0), atol=1e-9)


def test_non_finite_logits_are_refused():
    s = MetricSettings(num_classes=2, input_kind="logits")
    Z = np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32)
    with pytest.raises(ProbabilityError, match="1 logits are NaN"):
        pixel_terms(Z, np.array([0, 1]), s)
