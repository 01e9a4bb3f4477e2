"""Multi-rater scores (core/raters.py) against slow float64 / exact references.

The references are written from the definitions in docs/design/multi-rater.md with plain
Python loops: soft Dice per class and threshold with q compared as exact fractions, GED by
enumerating every sample × rater, sample × sample and rater × rater pair, IoU per pair
from pixel loops.
"""

from fractions import Fraction
from itertools import product

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klseg_cli.core.raters import (
    DICE_THRESHOLDS,
    RaterStats,
    dataset_values,
    disagreement,
    frequency_map,
    ged,
    rater_mious,
    rater_values,
    soft_dice_per_class,
)

# --- slow references ----------------------------------------------------------------------


def ref_frequency(codes, C):
    R, n = codes.shape
    q = np.zeros((C, n))
    for i in range(n):
        labels = [int(codes[r, i]) for r in range(R) if codes[r, i] >= 0]
        for c in labels:
            q[c, i] += 1.0 / len(labels)
    return q


def ref_soft_dice(P, codes, C):
    """Per class: mean over τ of Dice({p > τ}, {q > τ}); 1 at a τ where both are empty;
    NaN for a class empty in both at every τ. q compared exactly (Fraction)."""
    R, n = codes.shape
    out = []
    for c in range(C):
        scores, any_present = [], False
        for k in range(1, 10):
            tau = Fraction(k, 10)
            a = b = inter = 0
            for i in range(n):
                labels = [int(codes[r, i]) for r in range(R) if codes[r, i] >= 0]
                if not labels:
                    continue
                q = Fraction(labels.count(c), len(labels))
                in_a = float(P[c, i]) > k / 10
                in_b = q > tau
                a += in_a
                b += in_b
                inter += in_a and in_b
            if a + b:
                any_present = True
                scores.append(2 * inter / (a + b))
            else:
                scores.append(1.0)
        out.append(float(np.mean(scores)) if any_present else float("nan"))
    return np.array(out)


def ref_miou(x, y, classes):
    """Mean IoU over ``classes`` present in either map, on pixels both label; None if none."""
    both = [(a, b) for a, b in zip(x.tolist(), y.tolist()) if a >= 0 and b >= 0]
    ious = []
    for c in classes:
        inter = sum(1 for a, b in both if a == c and b == c)
        union = sum(1 for a, b in both if a == c or b == c)
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)) if ious else None


def ref_ged(samples, raters, classes):
    def d(x, y):
        m = ref_miou(x, y, classes)
        return 0.0 if m is None else 1.0 - m

    sy = np.mean([d(s, y) for s, y in product(samples, raters)])
    ss = np.mean([d(s, t) for s, t in product(samples, samples)])
    yy = np.mean([d(y, z) for y, z in product(raters, raters)])
    return 2 * sy - ss - yy


# --- cases --------------------------------------------------------------------------------


def make_case(rng, n, C, R, S, *, ignore=0.1):
    P = rng.dirichlet(np.ones(C) * 0.7, n).T.astype(np.float32)
    truth = rng.integers(0, C, n)
    codes = np.stack([np.where(rng.random(n) < 0.3, rng.integers(0, C, n), truth)
                      for _ in range(R)])  # fmt: skip
    codes[rng.random((R, n)) < ignore] = -1
    labelled = (codes >= 0).any(axis=0)
    P, codes = P[:, labelled], codes[:, labelled]
    samples = rng.integers(0, C, (S, P.shape[1])) if S else None
    return P, np.argmax(P, axis=0), codes, samples


def test_frequency_map_matches_the_counting_loop(rng):
    codes = rng.integers(-1, 4, (3, 200))
    q, raters = frequency_map(codes, 4)
    assert q.dtype == np.float32
    np.testing.assert_allclose(q, ref_frequency(codes, 4), rtol=1e-7, atol=0)
    np.testing.assert_array_equal(raters, (codes >= 0).sum(axis=0))
    # exactly the float32 nearest to n_c / n (what a --soft-gt file saved in float32 holds)
    labelled = raters > 0
    np.testing.assert_array_equal(
        q[:, labelled], ref_frequency(codes, 4)[:, labelled].astype(np.float32)
    )


@pytest.mark.parametrize("R,C", [(2, 2), (3, 4), (6, 3), (10, 2)])
def test_soft_dice_matches_the_slow_loop(rng, R, C):
    P, pred, codes, _ = make_case(rng, 300, C, R, 0)
    # probabilities exactly at and next to the thresholds, and q exactly at them
    P[:, :20] = np.float32(0.3)
    stats = RaterStats.from_chunk(P, pred, codes)
    np.testing.assert_allclose(soft_dice_per_class(stats), ref_soft_dice(P, codes, C), rtol=1e-12)


def test_soft_dice_q_at_a_threshold_is_not_above_it():
    """3 of 10 raters give q = 0.3: not above τ = 0.3 (compared exactly, not in floats:
    float32(0.3) > 0.3 in float64)."""
    codes = np.array([[1] * 3 + [0] * 7]).T  # (10 raters, 1 pixel)
    P = np.array([[0.7], [0.3]], dtype=np.float32)  # float32(0.3) > 0.3 as a float64
    stats = RaterStats.from_chunk(P, np.array([0]), codes)
    # class 1: q = 0.3 above τ = 0.1, 0.2 only; p = float32(0.3) above 0.1, 0.2 and 0.3
    assert stats.dice_joint[1, 3, 2] == 1 and stats.dice_joint[1].sum() == 1
    np.testing.assert_allclose(soft_dice_per_class(stats), ref_soft_dice(P, codes, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probability_levels_compare_with_the_thresholds_in_float64(rng, dtype):
    """Each p's level is the number of τ_k with float64(p) > τ_k, for float32 maps too
    (compared against the float32 just above each τ_k), also right at the thresholds."""
    from klseg_cli.core.raters import threshold_levels_p

    near = np.array([k / 10 for k in range(11)], dtype=dtype)
    values = np.concatenate([
        near, np.nextafter(near, dtype(0)), np.nextafter(near, dtype(1)),
        rng.random(2000).astype(dtype),
    ])[None].clip(0, 1)  # fmt: skip
    expected = [sum(float(v) > k / 10 for k in range(1, 10)) for v in values[0]]
    np.testing.assert_array_equal(threshold_levels_p(values)[0], expected)


def test_soft_dice_of_a_class_nobody_uses_is_undefined():
    codes = np.zeros((2, 5), dtype=np.int64)
    P = np.tile(np.array([[1.0], [0.0], [0.0]], dtype=np.float32), 5)
    stats = RaterStats.from_chunk(P, np.zeros(5, dtype=np.int64), codes)
    dice = soft_dice_per_class(stats)
    assert dice[0] == 1.0 and np.isnan(dice[1]) and np.isnan(dice[2])


@pytest.mark.parametrize("R,S,C", [(2, 0, 2), (3, 0, 3), (3, 2, 3), (4, 3, 5), (2, 4, 2)])
def test_ged_and_mious_match_enumeration(rng, R, S, C):
    P, pred, codes, samples = make_case(rng, 80, C, R, S)
    stats = RaterStats.from_chunk(P, pred, codes, samples)
    classes = list(range(C))
    sample_maps = list(samples) if S else [pred]
    expected_ged = ref_ged(sample_maps, list(codes), classes)
    assert ged(stats, classes) == pytest.approx(expected_ged, abs=1e-12)
    vs, pairwise = rater_mious(stats, classes)
    np.testing.assert_allclose(vs, [ref_miou(pred, y, classes) for y in codes], rtol=1e-12)
    expected = [ref_miou(codes[r], codes[s], classes) for r in range(R) for s in range(r + 1, R)]
    np.testing.assert_allclose(pairwise, expected, rtol=1e-12)


def test_ged_empty_versus_empty_is_distance_zero():
    """Binary task, background left out of the mean: two raters and the sample that mark no
    foreground are at distance 0 (Kohl et al.); one rater marking some makes d = 1 to it."""
    n = 6
    empty = np.zeros(n, dtype=np.int64)
    some = empty.copy()
    some[:2] = 1
    P = np.tile(np.array([[0.9], [0.1]], dtype=np.float32), n)
    codes = np.stack([empty, empty])
    stats = RaterStats.from_chunk(P, empty, codes)
    assert ged(stats, [1]) == 0.0
    vs, pairwise = rater_mious(stats, [1])
    assert np.isnan(vs).all() and np.isnan(pairwise).all()  # IoU itself stays undefined
    codes = np.stack([empty, some])
    stats = RaterStats.from_chunk(P, empty, codes)
    # E d(S,Y) = 1/2, E d(S,S') = 0, E d(Y,Y') = (0 + 1 + 1 + 0)/4
    assert ged(stats, [1]) == pytest.approx(2 * 0.5 - 0 - 0.5)
    assert ged(stats, [1]) == pytest.approx(ref_ged([empty], list(codes), [1]))


def test_a_perfect_sampler_of_the_raters_scores_ged_zero(rng):
    """Samples that are exactly the raters' maps: the two distributions are the same."""
    C = 3
    codes = rng.integers(0, C, (3, 50))
    P = rng.dirichlet(np.ones(C), 50).T.astype(np.float32)
    stats = RaterStats.from_chunk(P, np.argmax(P, 0), codes, codes.copy())
    assert ged(stats, range(C)) == pytest.approx(0.0, abs=1e-15)


@st.composite
def chunked(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(3, 120))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=2, max_size=2)))
    return seed, n, cuts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked())
def test_chunks_merge_by_plus_in_any_grouping(case):
    """Counts of three chunks merged either way equal the counts of all pixels at once."""
    seed, n, (a, b) = case
    rng = np.random.default_rng(seed)
    P, pred, codes, samples = make_case(rng, n, 3, 3, 2, ignore=0.0)
    m = P.shape[1]
    a, b = min(a, m), min(b, m)
    parts = [
        RaterStats.from_chunk(P[:, s], pred[s], codes[:, s], samples[:, s])
        for s in (slice(0, a), slice(a, b), slice(b, m))
    ]
    whole = RaterStats.from_chunk(P, pred, codes, samples)
    left = (parts[0] + parts[1]) + parts[2]
    right = parts[0] + (parts[1] + parts[2])
    for x in (left, right):
        np.testing.assert_array_equal(x.dice_joint, whole.dice_joint)
        np.testing.assert_array_equal(x.pair_inter, whole.pair_inter)
        np.testing.assert_array_equal(x.pair_union, whole.pair_union)


def test_dataset_values_pool_counts_and_average_images(rng):
    images = []
    for _ in range(3):
        P, pred, codes, _ = make_case(rng, 60, 3, 3, 0)
        images.append(RaterStats.from_chunk(P, pred, codes))
    values, total = dataset_values(images, [0, 1, 2])
    per_image = [rater_values(s, [0, 1, 2]) for s in images]
    assert values["ged_image_mean"] == pytest.approx(np.mean([v["ged"] for v in per_image]))
    assert values["ged_pooled"] == pytest.approx(rater_values(total, [0, 1, 2])["ged"])
    assert values["soft_dice_image_mean"] == pytest.approx(
        np.mean([v["soft_dice"] for v in per_image])
    )


def test_counts_of_other_rater_numbers_do_not_merge():
    with pytest.raises(ValueError):
        RaterStats.zeros(3, 2) + RaterStats.zeros(3, 3)


def test_disagreement_is_one_minus_the_top_frequency():
    codes = np.array([[0, 0, 1, -1], [0, 1, 2, -1], [0, 1, -1, -1]])
    values, labelled = disagreement(codes, 3)
    np.testing.assert_allclose(values[:3], [0.0, 1 / 3, 0.5], rtol=1e-7)
    np.testing.assert_array_equal(labelled, [True, True, True, False])


def test_thresholds_are_qubiqs():
    assert DICE_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@pytest.mark.parametrize("R,S,C", [(2, 0, 3), (3, 0, 5), (3, 2, 4), (4, 3, 2)])
def test_batched_formulas_match_rater_values(rng, R, S, C):
    """``rater_values_batch`` of stacked counts == ``rater_values`` of each, for sums of
    images too (the soft-Dice tails add up as the counts do), classes left out included."""
    from klseg_cli.core.raters import dice_tails, rater_values_batch, stack_rater_stats

    images = []
    for k in range(5):
        P, pred, codes, samples = make_case(rng, 60 + 17 * k, C, R, S, ignore=0.2)
        if k == 1:  # a class nobody uses and the prediction never picks
            codes[codes == C - 1] = -1 if C > 2 else codes[codes == C - 1]
        images.append(RaterStats.from_chunk(P, pred, codes, samples))
    sets = [*images, sum(images[1:], images[0]), images[0] + images[0]]
    stacked = stack_rater_stats(sets, images[0])
    tails = dice_tails(stacked["dice_joint"])
    summed = dice_tails(sum(s.dice_joint for s in images))
    np.testing.assert_array_equal(tails[len(images)], summed)
    for classes in (list(range(C)), list(range(1, C))):
        got = rater_values_batch(tails, stacked["pair_inter"], stacked["pair_union"],
                                 n_raters=R, n_samples=S, classes=classes)  # fmt: skip
        for b, stats in enumerate(sets):
            want = rater_values(stats, classes)
            for name, value in want.items():
                assert got[name][b] == pytest.approx(value, rel=1e-12, abs=1e-15, nan_ok=True), (
                    name, b, classes,
                )  # fmt: skip
