"""Bootstrap over images: the resampled metrics, determinism, coverage, noise-aware gates."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.core import bootstrap as bs
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.engine.local import evaluate
from klseg_cli.errors import UsageError
from klseg_cli.io.statsfile import StatsTable

from ..conftest import random_probs

SAMPLE = ("sample_data/predictions", "sample_data/ground_truth")


def test_counts_rows_sum_to_n_and_are_deterministic():
    a = np.concatenate(list(bs.count_blocks(37, 500, seed=3)))
    b = np.concatenate(list(bs.count_blocks(37, 500, seed=3)))
    c = np.concatenate(list(bs.count_blocks(37, 500, seed=4)))
    assert a.shape == (500, 37) and (a.sum(axis=1) == 37).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_resampled_metrics_equal_a_loop_over_resamples():
    """Each resample's metrics == the summary of an evaluation of exactly those images."""
    result = evaluate(*SAMPLE)
    summary = result.summary()
    table = StatsTable.from_result(result)
    (W,) = list(bs.count_blocks(len(table), 7, seed=1))
    samples = bs._samples(W, bs.Source.from_run(table, summary))
    for r in range(7):
        drawn = [s for s, k in zip(table.stems, W[r].astype(int)) for _ in range(k)]
        sub = table.select(drawn)
        sub.stems = [f"{s}#{k}" for k, s in enumerate(drawn)]  # duplicates are separate images
        expected = sub.to_result().summary()["dataset"]
        for name, value in expected.items():
            got = samples[name][r]
            assert (np.isnan(value) and np.isnan(got)) or got == pytest.approx(value, rel=1e-10)


def test_metrics_without_a_batched_formula_go_the_slow_way(monkeypatch):
    """A data-set metric the batched formulas do not know is still resampled (per resample)."""
    result = evaluate(*SAMPLE)
    summary = result.summary()
    table = StatsTable.from_result(result)
    src = bs.Source.from_run(table, summary)
    src.names = [*src.names, "n_valid_pooled"]

    def fake_dataset_metrics(rows, total, settings):
        return {"n_valid_pooled": float(total.n_valid)}

    monkeypatch.setattr(bs, "dataset_metrics", fake_dataset_metrics)
    (W,) = list(bs.count_blocks(len(table), 5, seed=0))
    samples = bs._samples(W, src)
    n = table.arrays["confusion"].sum(axis=(1, 2))
    assert np.array_equal(samples["n_valid_pooled"], W @ n)


def test_nan_in_one_image_only_reaches_the_resamples_that_draw_it():
    X = np.array([[1.0], [np.nan], [3.0]])
    W = np.array([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    T = bs.resampled_totals(W, X)
    assert T[0, 0] == 3.0 and np.isnan(T[1, 0]) and T[2, 0] == 9.0


def test_infinities_only_reach_the_resamples_that_draw_them_without_a_warning():
    X = np.array(
        [[1.0, 1.0, 0.0], [np.inf, 2.0, np.inf], [3.0, -np.inf, -np.inf], [np.nan, 0.0, 0.0]]
    )
    W = np.array([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 2.0, 0.0],
                  [0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [1.0, 3.0, 0.0, 0.0]])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T = bs.resampled_totals(W, X)
    # the slow obvious loop: sum only the drawn images, each as often as drawn
    for r in range(W.shape[0]):
        for j in range(X.shape[1]):
            want = sum((float(X[i, j]) for i in range(4) for _ in range(int(W[r, i]))), 0.0)
            assert (np.isnan(want) and np.isnan(T[r, j])) or T[r, j] == want, (r, j)
    assert T[0].tolist() == [3.0, 3.0, 0.0] and T[5, 0] == np.inf and T[1, 1] == -np.inf
    assert np.isnan(T[3, 0]) and np.isnan(T[1, 2])  # NaN drawn; +inf and −inf drawn


def test_bootstrap_of_soft_targets_with_infinite_reverse_kl_warns_nothing(tmp_path, rng):
    """Soft targets with q = 0 < p in some images: reverse KL is infinite there. The
    bootstrap once printed "invalid value encountered in matmul" and spread the infinity
    to every resample; now each resample's value is that of the images it drew."""
    from klseg_cli.core.stats import Stats, dataset_metrics

    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for i in range(6):
        p = random_probs(rng, 20 * 24, 3).reshape(20, 24, 3)
        q = random_probs(rng, 20 * 24, 3).reshape(20, 24, 3)
        if i % 2 == 0:
            p[0, 0], q[0, 0] = [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]  # q = 0 < p: KL(p‖q) = inf
        np.save(tmp_path / "p" / f"im{i}.npy", p)
        np.save(tmp_path / "g" / f"im{i}.npy", q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(tmp_path / "p", tmp_path / "g", soft_gt=True)
        summary = result.summary()
        table = StatsTable.from_result(result)
        assert np.isinf(table.arrays["sums"][::2, 1]).all()
        (W,) = list(bs.count_blocks(len(table), 200, seed=0))
        samples = bs._samples(W, bs.Source.from_run(table, summary))
        ci = bs.dataset_intervals(table, summary, n_resamples=200)
    drew_inf = W[:, ::2].sum(axis=1) > 0
    assert (~drew_inf).any() and drew_inf.any()
    assert np.isnan(samples["kl_reverse_pooled"][drew_inf]).all()  # infinite: undefined
    for r in np.flatnonzero(~drew_inf)[:5]:  # the rest: the pooled value of those images
        total = Stats.zeros(3, 15)
        for k, count in enumerate(W[r].astype(int)):
            for _ in range(count):
                total = total + table.image_stats(k)
        want = dataset_metrics([], total, result.settings)["kl_reverse_pooled"]
        assert samples["kl_reverse_pooled"][r] == pytest.approx(want, rel=1e-10)
    assert np.isnan(ci["kl_reverse_pooled"]).all()  # the point is undefined (DESIGN §2)
    assert all(np.isfinite(ci[k]).all() for k in ("kl_pooled", "miou_pooled", "ece_pooled"))


def simulated_source(rng, n, truth_scale=0.05):
    """Per-image sums drawn directly: n_i pixels, per-image mean KL v_i ~ Gamma(2, scale)."""
    pixels = rng.integers(100, 1000, size=n)
    v = rng.gamma(2.0, truth_scale, size=n)  # E[v] = 2 · scale, independent of n_i
    sums = np.zeros((n, 6))
    sums[:, 0] = v * pixels
    confusion = np.zeros((n, 2, 2), dtype=np.int64)
    confusion[:, 0, 0] = pixels
    zeros = np.zeros((n, 15), np.int64)
    arrays = {"sums": sums, "confusion": confusion, "ece_count": zeros, "ece_conf": zeros * 0.0,
              "ece_correct": zeros}  # fmt: skip
    return bs.Source(arrays, {"kl": v}, MetricSettings(num_classes=2),
                     ["kl_pooled", "kl_image_mean"])  # fmt: skip


def test_coverage_on_simulated_data_sets():
    """The 95% interval covers the true value in 90–99% of 200 simulated data sets.

    Pooled KL = Σ n_i v_i / Σ n_i and its image mean both estimate E[v] = 0.1 here.
    """
    rng = np.random.default_rng(2026)
    truth = 0.1
    hits = {"kl_pooled": 0, "kl_image_mean": 0}
    for k in range(200):
        src = simulated_source(rng, 40)
        (samples,) = bs.bootstrap([src], n_resamples=1000, seed=k)
        for name in hits:
            point = float(np.mean(src.image_values["kl"])) if "mean" in name else float(
                src.arrays["sums"][:, 0].sum() / src.arrays["confusion"].sum()
            )  # fmt: skip
            lo, hi = bs.interval(samples[name], point)
            hits[name] += lo <= truth <= hi
    for name, h in hits.items():
        assert 0.90 <= h / 200 <= 0.99, (name, h)


def test_interval_rules():
    assert bs.interval(np.array([1.0, 2.0]), None) == [pytest.approx(np.nan, nan_ok=True)] * 2
    lo, hi = bs.interval(np.arange(101.0), 50.0)
    assert (lo, hi) == pytest.approx((2.5, 97.5))
    lo, hi = bs.interval(np.array([np.nan] * 10 + list(np.arange(101.0))), 50.0)
    assert (lo, hi) == pytest.approx((2.5, 97.5))  # undefined resamples are left out
    with pytest.raises(UsageError):
        list(bs.count_blocks(5, 0, seed=0))


def test_bench_target_is_met_at_a_smaller_size():
    """A quick guard on the speed claim (the full one is benchmarks/bench_bootstrap.py)."""
    import time

    rng = np.random.default_rng(0)
    src = simulated_source(rng, 2000)
    t0 = time.perf_counter()
    bs.bootstrap([src], n_resamples=1000, seed=0)
    assert time.perf_counter() - t0 < 2.0


# --- the CLI: intervals, determinism, delta gates ------------------------------------------


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_intervals_are_deterministic_for_any_jobs(tmp_path):
    outs = []
    for jobs, seed in ((1, 0), (2, 0), (1, 5)):
        out = tmp_path / f"r{jobs}_{seed}"
        res = run("evaluate", *SAMPLE, "--out", out, "--bootstrap", 300, "--seed", seed,
                  "--jobs", jobs)  # fmt: skip
        assert res.exit_code == 0, res.output
        outs.append(json.loads((out / "summary.json").read_text()))
    assert outs[0]["dataset_ci"] == outs[1]["dataset_ci"]
    assert outs[0]["dataset_ci"] != outs[2]["dataset_ci"]
    assert outs[0]["bootstrap"] == {"resamples": 300, "seed": 0, "level": 0.95,
                                    "paired_by": "image stem"}  # fmt: skip
    ci = outs[0]["dataset_ci"]
    assert set(ci) == set(outs[0]["dataset"])
    assert ci["kl_reverse_pooled"] == [None, None]  # undefined value, undefined interval
    lo, hi = ci["miou_pooled"]
    assert lo <= outs[0]["dataset"]["miou_pooled"] <= hi


def make_set(root, rng, *, n=24, hw=(24, 32), C=4, flip=0.08, regress=0.0, seed_labels=7):
    """Targets shared by every model (seed_labels), predictions with their own errors."""
    lab_rng = np.random.default_rng(seed_labels)
    gt, pred = root / "gt", root / "pred"
    gt.mkdir(parents=True, exist_ok=True)
    pred.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i in range(n):
        h, w = hw
        labels = lab_rng.integers(0, C, size=(h, w)).astype(np.uint8)
        Image.fromarray(labels).save(gt / f"im_{i:02d}.png")
        decided = labels.copy().reshape(-1)
        wrong = rng.random(h * w) < flip + regress
        decided[wrong] = (decided[wrong] + rng.integers(1, C, size=wrong.sum())) % C
        p = random_probs(rng, h * w, C, sharp=1.0)
        p[np.arange(h * w), decided] += 1.0
        p /= p.sum(axis=1, keepdims=True)
        np.save(pred / f"im_{i:02d}.npy", p.reshape(h, w, C).astype(np.float32))
    return pred, gt


def test_delta_gate_fails_on_a_planted_regression_and_passes_on_noise(tmp_path):
    rng = np.random.default_rng(11)
    base_pred, gt = make_set(tmp_path / "base", rng)
    noise_pred, _ = make_set(tmp_path / "noise", rng)  # same quality, other random errors
    worse_pred, _ = make_set(tmp_path / "worse", rng, regress=0.06)
    res = run("evaluate", base_pred, gt, "--out", tmp_path / "base_report")
    assert res.exit_code == 0, res.output
    baseline = tmp_path / "base_report" / "summary.json"
    gate = "delta(miou_image_mean) >= -0.01"

    noisy = run("evaluate", noise_pred, gt, "--baseline", baseline, "--require", gate,
                "--format", "json")  # fmt: skip
    assert noisy.exit_code == 0, noisy.output
    summary = json.loads(noisy.stdout)
    row = summary["requirements"][0]
    assert row["passed"] and row["interval"][0] <= row["value"] <= row["interval"][1]
    assert summary["delta_images"] == 24
    # the point estimate alone may move either way; the interval straddles −0.01 or lies above

    worse = run("evaluate", worse_pred, gt, "--baseline", baseline, "--require", gate,
                "--format", "json")  # fmt: skip
    assert worse.exit_code == 1, worse.output
    row = json.loads(worse.stdout)["requirements"][0]
    assert not row["passed"] and row["interval"][1] < -0.01
    assert "lies wholly below -0.01" in row["reason"]


def test_delta_needs_a_baseline_and_its_stats(tmp_path):
    res = run("evaluate", *SAMPLE, "--require", "delta(miou_pooled) >= 0")
    assert res.exit_code == 2 and "pass --baseline" in res.output
    out = tmp_path / "r"
    assert run("evaluate", *SAMPLE, "--out", out).exit_code == 0
    (out / "stats.npz").unlink()
    res = run("evaluate", *SAMPLE, "--baseline", out / "summary.json",
              "--require", "delta(miou_pooled) >= 0")  # fmt: skip
    assert res.exit_code == 2
    assert "no stats.npz beside it; delta() needs" in res.output


def test_different_image_sets_are_an_error_or_the_intersection(tmp_path):
    rng = np.random.default_rng(3)
    pred, gt = make_set(tmp_path / "a", rng, n=6)
    assert run("evaluate", pred, gt, "--out", tmp_path / "base").exit_code == 0
    (pred / "im_05.npy").unlink()
    (gt / "im_05.png").unlink()
    args = ("evaluate", pred, gt, "--baseline", tmp_path / "base" / "summary.json",
            "--require", "delta(miou_pooled) >= -0.5", "--format", "json")  # fmt: skip
    res = run(*args)
    assert res.exit_code == 2
    assert "1 images only in the baseline (im_05)" in res.output
    assert "--common-images" in res.output
    res = run(*args, "--common-images")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["delta_images"] == 5
    assert summary["delta"]["miou_pooled"] == pytest.approx(0.0, abs=1e-12)  # same maps


def test_gate_recomputes_intervals_from_stats_npz(tmp_path):
    out = tmp_path / "r"
    res = run("evaluate", *SAMPLE, "--out", out, "--bootstrap", 200, "--seed", 3)
    assert res.exit_code == 0
    summary = json.loads((out / "summary.json").read_text())
    low = summary["dataset_ci"]["miou_pooled"][0]
    ok = run("gate", out / "summary.json", "--require", f"low(miou_pooled) >= {low - 1e-9}")
    assert ok.exit_code == 0, ok.output  # the same resamples and seed as evaluate used
    bad = run("gate", out / "summary.json", "--require", f"low(miou_pooled) >= {low + 1e-9}")
    assert bad.exit_code == 1
    same = run("gate", out / "summary.json", "--baseline", out / "summary.json",
               "--require", "delta(kl_pooled) <= 0")  # fmt: skip
    assert same.exit_code == 0, same.output
    (out / "stats.npz").unlink()
    saved = run("gate", out / "summary.json", "--require", f"low(miou_pooled) >= {low - 1e-9}")
    assert saved.exit_code == 0, saved.output  # the intervals saved in summary.json


@pytest.mark.parametrize(
    "text, bound, metric, op, number",
    [
        ("low(miou_pooled) >= 0.7", "low", "miou_pooled", ">=", 0.7),
        ("high( kl_pooled )<=0.35", "high", "kl_pooled", "<=", 0.35),
        ("delta(miou_image_mean) >= -0.01", "delta", "miou_image_mean", ">=", -0.01),
    ],
)
def test_bound_expressions_parse(text, bound, metric, op, number):
    from klseg_cli.commands.requirements import check_names, parse_requirement

    req = parse_requirement(text)
    assert (req.bound, req.metric, req.op, req.number) == (bound, metric, op, number)
    assert req.name == f"{bound}({metric})"
    check_names([text])


@pytest.mark.parametrize(
    "text, why",
    [
        ("mean(miou_pooled) > 1", "'mean' is not one of low, high, delta"),
        ("low(miou_pooled) >= baseline - 0.01", "compares a data-set metric with a number"),
        ("low(iou[road]) > 0.5", "cannot read"),
        ("low(nope_pooled) > 0.5", "unknown name 'nope_pooled'"),
    ],
)
def test_bound_expression_errors(text, why):
    from klseg_cli.commands.requirements import check_names

    with pytest.raises(UsageError, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_names([text])


def test_delta_decides_by_the_interval_edge():
    from klseg_cli.commands.requirements import check_requirements

    summary = {"dataset": {"m": 0.5}, "classes": [], "delta": {"m": -0.02},
               "delta_ci": {"m": [-0.04, -0.005]}}  # fmt: skip
    rows = check_requirements(summary, ["delta(m) >= -0.01", "delta(m) <= -0.03",
                                        "delta(m) > -0.004", "delta(m) < -0.04"])  # fmt: skip
    assert [r["passed"] for r in rows] == [True, True, False, False]
    assert rows[0]["value"] == -0.02 and rows[0]["interval"] == [-0.04, -0.005]


def test_the_identity_resample_gives_the_point_estimates():
    """Counts of one for every image reproduce summary.json's dataset exactly."""
    result = evaluate(*SAMPLE, smoothing=0.1)  # reverse KL defined: no NaN
    summary = result.summary()
    table = StatsTable.from_result(result)
    samples = bs._samples(np.ones((1, len(table))), bs.Source.from_run(table, summary))
    for name, value in summary["dataset"].items():
        assert samples[name][0] == pytest.approx(value, rel=1e-12, nan_ok=True), name


def test_every_current_dataset_metric_has_a_batched_formula():
    from klseg_cli.commands.requirements import dataset_keys

    assert bs.covered(dataset_keys()) == dataset_keys()


# --- --rater: the pooled multi-rater scores --------------------------------------------------

RATERS = [f"sample_data/raters/rater_{r}" for r in "abc"]


@pytest.fixture(scope="module")
def rater_run():
    from klseg_cli.engine.raters import evaluate_raters

    result = evaluate_raters(
        SAMPLE[0], RATERS, samples=[SAMPLE[0], "sample_data/predictions_b"],
        classes="sample_data/classes.txt", exclude_class=["sky"],
    )  # fmt: skip
    return result, result.summary(), StatsTable.from_result(result)


def test_pooled_rater_intervals_match_a_slow_loop_of_resamples(rater_run):
    """Each resample's *_pooled rater scores == rater_values of the drawn images' summed
    counts (one RaterStats sum per resample, the obvious way), and so do the intervals."""
    from klseg_cli.core.raters import RATER_METRICS, rater_values

    result, summary, table = rater_run
    n_resamples = 300
    (samples,) = bs.bootstrap([bs.Source.from_run(table, summary)], n_resamples=n_resamples,
                              seed=5)  # fmt: skip
    W = np.concatenate(list(bs.count_blocks(len(table), n_resamples, seed=5)))
    classes = result.settings.mean_classes
    slow = {m: np.empty(n_resamples) for m in RATER_METRICS}
    for r in range(n_resamples):
        total = None
        for k, count in enumerate(W[r].astype(int)):
            for _ in range(count):
                stats = table.rater_stats(k)
                total = stats if total is None else total + stats
        for name, value in rater_values(total, classes).items():
            slow[name][r] = value
    ci = bs.dataset_intervals(table, summary, n_resamples=n_resamples, seed=5)
    for m in RATER_METRICS:
        np.testing.assert_allclose(samples[f"{m}_pooled"], slow[m], rtol=1e-12)
        lo, hi = bs.interval(slow[m], summary["dataset"][f"{m}_pooled"])
        assert ci[f"{m}_pooled"] == pytest.approx([lo, hi], rel=1e-12)
        assert lo < summary["dataset"][f"{m}_pooled"] < hi


def test_the_identity_resample_gives_the_rater_point_estimates(rater_run):
    _, summary, table = rater_run
    samples = bs._samples(np.ones((1, len(table))), bs.Source.from_run(table, summary))
    for name in ("soft_dice_pooled", "ged_pooled", "miou_vs_raters_pooled",
                 "rater_pairwise_miou_pooled"):  # fmt: skip
        assert samples[name][0] == pytest.approx(summary["dataset"][name], rel=1e-12), name


def test_a_stats_npz_without_rater_counts_gives_null_pooled_rater_intervals(rater_run):
    """A stats.npz written before the counts were kept: the *_pooled rater scores have no
    interval (null), quickly (no resample-by-resample loop), the image means still do."""
    _, summary, table = rater_run
    table = dataclasses.replace(table, rater_items=None, rater_arrays={}, rater_settings=None)
    ci = bs.dataset_intervals(table, summary, n_resamples=100)
    assert np.isnan(ci["ged_pooled"]).all() and np.isnan(ci["soft_dice_pooled"]).all()
    assert np.isfinite(ci["ged_image_mean"]).all() and np.isfinite(ci["kl_pooled"]).all()


def test_every_rater_dataset_metric_has_a_batched_formula():
    from klseg_cli.core.raters import dataset_names

    assert bs.covered(dataset_names()) == dataset_names()


def test_rater_bootstrap_cost_for_1000_resamples():
    """A quick guard (the full one is ``benchmarks/bench_bootstrap.py --raters 3``): 2000
    images × 19 classes, 3 raters and the prediction (6 item pairs), 1000 resamples of the
    pooled rater scores in under 2 s."""
    import time

    from klseg_cli.core.raters import N_LEVELS

    rng = np.random.default_rng(0)
    n, C, R = 2000, 19, 3
    arrays = {
        "dice_joint": rng.integers(0, 50, (n, C, N_LEVELS, N_LEVELS)),
        "pair_inter": rng.integers(0, 100, (n, 6, C)),
    }
    arrays["pair_union"] = arrays["pair_inter"] + rng.integers(0, 30, (n, 6, C))
    names = [f"{m}_pooled" for m in ("soft_dice", "ged", "miou_vs_raters", "rater_pairwise_miou")]
    src = bs.Source({}, {}, MetricSettings(num_classes=C), names, batch=lambda t, s: {},
                    rater_items=(R, 0), rater_arrays=arrays)  # fmt: skip
    t0 = time.perf_counter()
    (samples,) = bs.bootstrap([src], n_resamples=1000, seed=0)
    elapsed = time.perf_counter() - t0
    assert all(np.isfinite(samples[k]).all() for k in names)
    assert elapsed < 2.0, elapsed
