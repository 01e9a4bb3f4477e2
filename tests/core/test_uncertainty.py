"""Failure-detection quantities against exact float64 references (DESIGN §11.2)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu, rankdata, spearmanr

from klseg_cli.core import uncertainty as unc


def exact_aurc(scores: np.ndarray, wrong: np.ndarray) -> float:
    """Direct sort; tie groups get their expected error count, e(K + j) = E + j·w/n."""
    order = np.argsort(scores, kind="mergesort")
    s, e = scores[order], wrong[order].astype(np.float64)
    N = s.size
    _, start = np.unique(s, return_index=True)
    stop = np.r_[start[1:], N]
    cum = np.empty(N)
    E = 0.0
    for a, b in zip(start, stop):
        n, w = b - a, e[a:b].sum()
        cum[a:b] = E + np.arange(1, n + 1) * w / n
        E += w
    return float(np.mean(cum / np.arange(1, N + 1)))


def exact_ueo(scores: np.ndarray, wrong: np.ndarray) -> float:
    best = 0.0
    W = wrong.sum()
    for t in np.unique(scores):
        u = scores >= t
        best = max(best, 2 * np.sum(u & wrong) / (u.sum() + W))
    return float(best)


def random_chunk(rng, n, C, sharp):
    logits = rng.normal(size=(C, n)) * sharp
    p = np.exp(logits - logits.max(axis=0))
    p /= p.sum(axis=0)
    p = p.astype(np.float32)
    y = np.where(rng.random(n) < 0.8, p.argmax(axis=0), rng.integers(0, C, n))
    return p, y


def scores_of(p, names):
    conf = p.max(axis=0)
    pred = p.argmax(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(p * np.log(p + np.finfo(np.float32).tiny)).sum(axis=0)
    return unc.chunk_scores(names, p=p, confidence=conf, pred=pred, entropy=ent), pred


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 3000),
    C=st.integers(2, 7),
    sharp=st.floats(0.5, 8),
    seed=st.integers(0, 2**31),
)
def test_binned_quantities_within_their_bounds_of_exact(n, C, sharp, seed):
    rng = np.random.default_rng(seed)
    p, y = random_chunk(rng, n, C, sharp)
    scores, pred = scores_of(p, unc.SCORES)
    wrong = pred != y
    hist, sums = unc.chunk_histograms(scores, wrong)
    for s in range(len(unc.SCORES)):
        u = np.maximum(scores[s].astype(np.float64), 0.0)
        fd = unc.failure_detection(hist[s])
        assert sums[s] == pytest.approx(float(scores[s].astype(np.float64).sum()), rel=1e-12)
        if 0 < wrong.sum() < n:
            ref = mannwhitneyu(u[wrong], u[~wrong]).statistic / (wrong.sum() * (~wrong).sum())
            assert abs(fd["auroc"] - ref) <= fd["auroc_bound"] + 1e-12
        else:
            assert math.isnan(fd["auroc"])
        assert abs(fd["aurc"] - exact_aurc(u, wrong)) <= fd["aurc_bound"] + 1e-12
        ref_ueo = exact_ueo(u, wrong)
        assert fd["ueo"] <= ref_ueo + 1e-12
        assert ref_ueo <= fd["ueo"] + fd["ueo_bound"] + 1e-12


def test_distinct_bins_give_exact_values():
    """Scores that never share a bin: the histogram values are the exact rank values."""
    rng = np.random.default_rng(3)
    n = 1777  # a size the code does not know
    chosen = rng.choice(np.arange(1, unc.BINS - 1), n, replace=False)
    u = rng.permutation((unc.bin_edges()[chosen] * (1 + 2**-12)).astype(np.float32))
    assert np.unique(unc.bin_index(u)).size == n
    wrong = rng.random(n) < 0.3
    hist, _ = unc.chunk_histograms(u[None], wrong)
    fd = unc.failure_detection(hist[0])
    u64 = u.astype(np.float64)
    ranks = rankdata(u64)
    nw, nc = wrong.sum(), (~wrong).sum()
    ref = (ranks[wrong].sum() - nw * (nw + 1) / 2) / (nw * nc)
    assert fd["auroc"] == pytest.approx(ref, abs=1e-13)
    assert fd["auroc_bound"] == 0 and fd["aurc_bound"] == 0 and fd["ueo_bound"] == 0
    assert fd["aurc"] == pytest.approx(exact_aurc(u64, wrong), abs=1e-13)
    assert fd["ueo"] == pytest.approx(exact_ueo(u64, wrong), abs=1e-13)


def test_exact_zeros_are_ties_without_error():
    """Saturated pixels (score exactly 0) tie in the exact computation too: no bound."""
    rng = np.random.default_rng(4)
    u = np.where(rng.random(3001) < 0.7, 0.0, rng.random(3001)).astype(np.float32)
    u[:7] = np.float32(1e-25)  # tiny but positive: above the zeros
    wrong = rng.random(3001) < 0.1
    hist, _ = unc.chunk_histograms(u[None], wrong)
    fd = unc.failure_detection(hist[0])
    u64 = u.astype(np.float64)
    ref = mannwhitneyu(u64[wrong], u64[~wrong]).statistic / (wrong.sum() * (~wrong).sum())
    assert fd["auroc"] == pytest.approx(ref, abs=fd["auroc_bound"] + 1e-13)
    assert fd["auroc_bound"] < 1e-3  # the 2,100 zeros contribute nothing
    assert abs(fd["aurc"] - exact_aurc(u64, wrong)) <= fd["aurc_bound"] + 1e-13


def test_optimal_aurc_and_eaurc():
    rng = np.random.default_rng(5)
    for n, nw in ((1, 0), (10, 1), (503, 77), (4000, 3999)):
        wrong = np.zeros(n, bool)
        wrong[rng.choice(n, nw, replace=False)] = True
        u = np.where(wrong, 2.0, 1.0) + rng.random(n) * 0.5  # errors ranked last: optimal
        hist, _ = unc.chunk_histograms(u[None].astype(np.float32), wrong)
        fd = unc.failure_detection(hist[0])
        direct = sum((k - (n - nw)) / k for k in range(n - nw + 1, n + 1)) / n
        assert fd["aurc_optimal"] == pytest.approx(direct, abs=1e-13)
        assert fd["aurc"] == pytest.approx(direct, abs=1e-12)
        assert fd["eaurc"] == pytest.approx(0.0, abs=1e-12)
        r = nw / n
        if 0 < r < 1 and n > 1000:  # Geifman et al.'s continuous formula, large n
            assert fd["aurc_optimal"] == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-2)


def test_harmonic_gap_against_a_sum():
    for start, count in ((0, 1), (0, 17), (3, 5), (15, 1), (1000, 4321), (10**9, 3)):
        direct = math.fsum(1.0 / (start + j) for j in range(1, count + 1))
        assert unc.harmonic_gap(start, count) == pytest.approx(direct, rel=1e-12)


def test_empty_and_one_sided():
    fd = unc.failure_detection(np.zeros((2, unc.BINS), np.int64))
    assert math.isnan(fd["auroc"]) and math.isnan(fd["aurc"]) and math.isnan(fd["ueo"])
    hist = np.zeros((2, unc.BINS), np.int64)
    hist[0, 100] = 5
    fd = unc.failure_detection(hist)
    assert math.isnan(fd["auroc"]) and fd["aurc"] == 0 and fd["eaurc"] == 0 and fd["ueo"] == 0


def test_bins_are_monotone_and_cover_the_range():
    x = np.sort(np.random.default_rng(0).random(100000).astype(np.float32) ** 8)
    b = unc.bin_index(x)
    assert (np.diff(b) >= 0).all()
    assert unc.bin_index(np.float32([0.0, -1e-9, 1e-30, 11.0, 100.0])).tolist() == [
        0,
        0,
        1,
        unc.bin_index(np.float32([11.0]))[0],
        unc.BINS - 1,
    ]
    edges = unc.bin_edges()
    mid = np.float32(edges[1:-1] * (1 + 2**-12))
    assert (unc.bin_index(mid) == np.arange(1, unc.BINS - 1)).all()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 2000), parts=st.lists(st.integers(0, 2000), min_size=1, max_size=4),
       seed=st.integers(0, 2**31))  # fmt: skip
def test_merge_is_associative_and_chunk_size_invariant(n, parts, seed):
    rng = np.random.default_rng(seed)
    p, y = random_chunk(rng, n, 4, 3.0)
    scores, pred = scores_of(p, unc.SCORES)
    wrong = pred != y
    whole = unc.chunk_histograms(scores, wrong)
    cuts = sorted({min(c, n) for c in parts} | {0, n})
    pieces = [unc.chunk_histograms(scores[:, a:b], wrong[a:b]) for a, b in itertools.pairwise(cuts)]
    left = pieces[0][0]
    for h, _ in pieces[1:]:
        left = left + h
    right = pieces[-1][0]
    for h, _ in reversed(pieces[:-1]):
        right = h + right
    assert (left == whole[0]).all() and (right == whole[0]).all()
    assert sum(s for _, s in pieces) == pytest.approx(whole[1], rel=1e-12, abs=1e-12)


def test_image_level_against_scipy():
    rng = np.random.default_rng(9)
    for n in (2, 7, 61):
        x = rng.integers(0, 5, n).astype(float)
        y = rng.random(n)
        assert unc.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
        pos = rng.random(n) < 0.4
        if 0 < pos.sum() < n:
            ref = mannwhitneyu(x[pos], x[~pos]).statistic / (pos.sum() * (~pos).sum())
            assert unc.auroc_exact(x, pos) == pytest.approx(ref, abs=1e-12)
    assert math.isnan(unc.spearman([1.0], [2.0]))
    assert math.isnan(unc.auroc_exact([1.0, 2.0], [True, True]))


def test_coarse_grid_is_a_merge_of_fine_bins():
    rng = np.random.default_rng(2)
    u = rng.random(5000).astype(np.float32) ** 4
    wrong = rng.random(5000) < 0.2
    fine, _ = unc.chunk_histograms(u[None], wrong)
    coarse = unc.coarsen(fine)
    assert coarse.shape[-1] == unc.OCTAVES << unc.COARSE_BITS
    assert (coarse.sum(axis=-1) == fine.sum(axis=-1)).all()
    fd_f, fd_c = unc.failure_detection(fine[0]), unc.failure_detection(coarse[0])
    assert abs(fd_f["auroc"] - fd_c["auroc"]) <= fd_c["auroc_bound"] + 1e-12


def test_margin_of_a_class_major_view():
    """A (C, n) view of an (n, C) array (not C-contiguous) gives the same margins."""
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], np.float32)
    ent = np.zeros(2, np.float32)
    s = unc.chunk_scores(["margin"], p=p.T, confidence=p.max(1), pred=p.argmax(1), entropy=ent)
    assert s[0] == pytest.approx([0.5, 0.95])


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="unknown uncertainty score 'foo'"):
        unc.check_scores(["entropy", "foo"])
    assert unc.check_scores(["Entropy", "margin", "entropy"]) == ("entropy", "margin")
