"""--uncertainty through the engines: NumPy path = kernel = Evaluator API = CLI (DESIGN §11)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.commands.evaluator import Evaluator
from klseg_cli.core import uncertainty as unc
from klseg_cli.engine.local import evaluate

from ..conftest import assert_kernel_took, random_probs, recording_kernel

SCORES = ("entropy", "maxprob", "margin")


@pytest.fixture
def folders(tmp_path, rng):
    """Four 37×53 HWC float32 maps (5 classes, some saturated pixels) and label PNGs with
    ignored pixels; image 3 is mostly wrong (for the image-level QC numbers)."""
    from PIL import Image

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    H, W, C = 37, 53, 5
    for k in range(4):
        p = random_probs(rng, H * W, C, saturate=0.3).reshape(H, W, C)
        # labels drawn from the prediction itself: wrong pixels are the uncertain ones
        draw = rng.random((H, W, 1)) < np.cumsum(p, axis=-1)
        y = np.where(draw.any(-1), draw.argmax(-1), C - 1)
        if k == 3:
            y = rng.integers(0, C, (H, W))
        y[:2, :5] = 255
        np.save(pred / f"img{k}.npy", p)
        Image.fromarray(y.astype(np.uint8)).save(gt / f"img{k}.png")
    return pred, gt


def exact_pooled(pred_dir, gt_dir, name):
    """Exact AUROC (scipy's Mann–Whitney) over every valid pixel, for the bound check."""
    from PIL import Image
    from scipy.stats import mannwhitneyu

    us, wr = [], []
    for f in sorted(pred_dir.glob("*.npy")):
        p = np.load(f).reshape(-1, 5).T
        y = np.asarray(Image.open(gt_dir / f"{f.stem}.png")).reshape(-1).astype(int)
        keep = y != 255
        p, y = p[:, keep], y[keep]
        ent = -(p * np.log(p + np.finfo(np.float32).tiny)).sum(axis=0)
        s = unc.chunk_scores([name], p=p, confidence=p.max(0), pred=p.argmax(0), entropy=ent)
        us.append(np.maximum(s[0].astype(np.float64), 0))
        wr.append(p.argmax(0) != y)
    u, w = np.concatenate(us), np.concatenate(wr)
    return mannwhitneyu(u[w], u[~w]).statistic / (w.sum() * (~w).sum())


def test_numpy_and_kernel_paths_agree_within_ulps(folders):
    pred, gt = folders
    a = evaluate(pred, gt, uncertainty=SCORES, jobs=1)
    with recording_kernel() as taken:
        from klseg_cli.engine import image as local  # image_stats asks it

        real = local.uses_kernel
        local.uses_kernel = lambda *a, **k: True
        try:
            b = evaluate(pred, gt, uncertainty=SCORES, jobs=1)
        finally:
            local.uses_kernel = real
    assert_kernel_took(taken)
    ha, hb = a.total.unc_hist, b.total.unc_hist
    assert ha.shape == hb.shape == (3, 2, unc.BINS)
    # maxprob and margin are the same float32 numbers; the kernel's entropy is within a
    # few ulps of NumPy's, so a pixel may land one bin over
    assert (ha[1:] == hb[1:]).all()
    assert np.abs(ha[0] - hb[0]).sum() <= 0.01 * ha[0].sum()
    assert (ha.sum(axis=-1) == hb.sum(axis=-1)).all()
    da, db = a.summary()["dataset"], b.summary()["dataset"]
    for s in SCORES:
        for q in unc.PIXEL_NAMES:
            assert da[f"{q}_{s}_pooled"] == pytest.approx(db[f"{q}_{s}_pooled"], abs=1e-3)
    assert a.total.unc_sum == pytest.approx(b.total.unc_sum, rel=1e-5)


def test_pooled_auroc_within_its_bound_of_exact(folders):
    pred, gt = folders
    s = evaluate(pred, gt, uncertainty=SCORES).summary()
    for name in SCORES:
        exact = exact_pooled(pred, gt, name)
        bound = s["uncertainty"]["scores"][name]["auroc_bound"]
        assert abs(s["dataset"][f"auroc_{name}_pooled"] - exact) <= bound + 1e-12
        assert bound < 0.01


def test_plain_evaluate_has_no_uncertainty_fields(folders):
    pred, gt = folders
    r = evaluate(pred, gt)
    assert r.total.unc_hist is None
    s = r.summary()
    assert "uncertainty" not in s and "auroc_entropy_pooled" not in s["dataset"]
    assert "uncertainty" not in s["settings"]


def test_evaluator_api_matches_evaluate(folders):
    from PIL import Image

    pred, gt = folders
    folder = evaluate(pred, gt, uncertainty=("entropy", "margin"), qc_threshold=0.3).summary()
    ev = Evaluator(5, uncertainty=("entropy", "margin"), qc_threshold=0.3)
    for f in sorted(pred.glob("*.npy")):
        ev.update(np.load(f), np.asarray(Image.open(gt / f"{f.stem}.png")), stems=f.stem)
    api = ev.compute()
    for key in unc.dataset_names(("entropy", "margin")):
        a, b = api["dataset"][key], folder["dataset"][key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12), key
    half = Evaluator(5, uncertainty=("entropy", "margin"), qc_threshold=0.3)
    other = Evaluator(5, uncertainty=("entropy", "margin"), qc_threshold=0.3)
    for k, f in enumerate(sorted(pred.glob("*.npy"))):
        (half if k % 2 else other).update(
            np.load(f), np.asarray(Image.open(gt / f"{f.stem}.png")), stems=f.stem
        )
    merged = half.merge(other).compute()
    assert merged["dataset"]["auroc_entropy_pooled"] == api["dataset"]["auroc_entropy_pooled"]
    assert merged["dataset"]["spearman_entropy"] == api["dataset"]["spearman_entropy"]


def test_image_level_numbers(folders):
    pred, gt = folders
    s = evaluate(pred, gt, uncertainty=("entropy",), qc_threshold=0.5).summary()
    rows = s["images"]
    u = [r["uncertainty_entropy"] for r in rows]
    err = [1 - r["miou"] for r in rows]
    from scipy.stats import spearmanr

    assert s["dataset"]["spearman_entropy"] == pytest.approx(spearmanr(u, err).statistic)
    below = [r["miou"] < 0.5 for r in rows]
    assert any(below) and not all(below)
    ref = unc.auroc_exact(u, below)
    assert s["dataset"]["qc_auroc_entropy"] == pytest.approx(ref)
    assert rows[0]["uncertainty_entropy"] == pytest.approx(rows[0]["entropy"], rel=1e-12)


def test_cli_report_qc_csv_risk_coverage_and_require(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "report"
    png = tmp_path / "rc.png"
    res = CliRunner().invoke(app, [
        "evaluate", str(pred), str(gt), "--uncertainty", "entropy,margin", "--out", str(out),
        "--risk-coverage", str(png), "--qc-threshold", "0.5",
        "--require", "auroc_entropy_pooled >= 0.5", "--format", "json",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    api = evaluate(pred, gt, uncertainty=("entropy", "margin")).summary()
    for key in unc.dataset_names(("entropy", "margin")):
        a, b = summary["dataset"][key], api["dataset"][key]
        assert (a is None and math.isnan(b)) or a == pytest.approx(b, rel=1e-12), key
    assert summary["requirements"][0]["passed"]
    qc = (out / "qc.csv").read_text().splitlines()
    assert qc[0].startswith("rank,image,uncertainty_entropy,uncertainty_margin,miou,error")
    assert len(qc) == 5
    assert (
        qc[1].split(",")[1] == max(api["images"], key=lambda r: r["uncertainty_entropy"])["image"]
    )
    header = (out / "per_image.csv").read_text().splitlines()[0]
    assert "auroc_entropy" in header and "ueo_margin" in header
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_require_turns_uncertainty_on(folders):
    pred, gt = folders
    res = CliRunner().invoke(app, [
        "evaluate", str(pred), str(gt), "--require", "eaurc_maxprob_pooled <= 1",
        "--format", "json",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["settings"]["uncertainty"] == ["maxprob"]


def test_bad_score_is_a_usage_error(folders):
    pred, gt = folders
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt), "--uncertainty", "variance"])
    assert res.exit_code == 2
    assert "unknown uncertainty score 'variance'" in res.output


def test_bootstrap_intervals_and_stats_npz_round_trip(folders, tmp_path):
    from klseg_cli.core.bootstrap import dataset_intervals
    from klseg_cli.io.statsfile import StatsTable, load_stats, write_stats

    pred, gt = folders
    result = evaluate(pred, gt, uncertainty=("entropy",))
    summary = result.summary()
    path = tmp_path / "stats.npz"
    write_stats(StatsTable.from_result(result), path)
    table = load_stats(path)
    assert table.arrays["unc_hist"].shape == (4, 1, 2, unc.BINS)
    again = table.to_result().summary()
    for key in unc.dataset_names(("entropy",)):
        a, b = again["dataset"][key], summary["dataset"][key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12), key
    ci = dataset_intervals(table, summary, n_resamples=200, seed=1)
    for key in ("auroc_entropy_pooled", "aurc_entropy_pooled", "ueo_entropy_pooled",
                "auroc_entropy_image_mean", "spearman_entropy"):  # fmt: skip
        lo, hi = ci[key]
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi, key
    lo, hi = ci["auroc_entropy_pooled"]
    assert lo - 0.01 <= summary["dataset"]["auroc_entropy_pooled"] <= hi + 0.01


def test_compare_and_baseline_gate(folders, tmp_path):
    pred, gt = folders
    run = CliRunner().invoke
    first = tmp_path / "first"
    res = run(app, ["evaluate", str(pred), str(gt), "--uncertainty", "entropy",
                    "--out", str(first)])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = run(app, [
        "evaluate", str(pred), str(gt), "--uncertainty", "entropy", "--baseline",
        str(first / "summary.json"), "--require", "auroc_entropy_pooled >= baseline - 0.001",
        "--require", "ueo_entropy_pooled > 0.99", "--format", "json",
    ])  # fmt: skip
    assert res.exit_code == 1, res.output  # the second requirement fails, the first holds
    reqs = json.loads(res.stdout)["requirements"]
    assert [r["passed"] for r in reqs] == [True, False]
    res = run(app, ["compare", str(pred), str(pred), str(gt), "--uncertainty", "entropy",
                    "--bootstrap", "50", "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["delta"]["auroc_entropy_pooled"] == 0.0
    assert out["delta_ci"]["auroc_entropy_pooled"] == [0.0, 0.0]
    assert out["models"]["a"]["auroc_entropy_pooled"] == pytest.approx(
        evaluate(pred, gt, uncertainty=("entropy",)).summary()["dataset"]["auroc_entropy_pooled"]
    )


@pytest.mark.cluster
def test_dask_gives_the_numbers_of_a_local_run(folders):
    pytest.importorskip("distributed")
    pred, gt = folders
    args = ["evaluate", str(pred), str(gt), "--uncertainty", "entropy,margin", "--format", "json"]
    local = CliRunner().invoke(app, [*args, "--jobs", "1"])
    dask = CliRunner().invoke(app, [*args, "--scheduler", "local:2"])
    assert local.exit_code == 0 and dask.exit_code == 0, dask.output
    a, b = json.loads(local.stdout), json.loads(dask.stdout)
    assert a["dataset"] == b["dataset"] and a["images"] == b["images"]
    assert a["uncertainty"] == b["uncertainty"]


@pytest.mark.parametrize("kernel", [False, True])
def test_chunk_size_does_not_change_the_histograms(folders, kernel):
    from klseg_cli.engine import image as local  # image_stats asks it

    pred, gt = folders
    real = local.uses_kernel
    local.uses_kernel = lambda pm, settings, accelerate: kernel and real(pm, settings, True)
    try:
        runs = [evaluate(pred, gt, uncertainty=SCORES, chunk_pixels=c, jobs=1).total
                for c in (1 << 15, 777, 64)]  # fmt: skip
    finally:
        local.uses_kernel = real
    for other in runs[1:]:
        assert (other.unc_hist == runs[0].unc_hist).all()
        assert other.unc_sum == pytest.approx(runs[0].unc_sum, rel=1e-12)


def test_soft_targets_use_the_argmax_of_q(folders, tmp_path):
    """With --soft-gt a pixel is wrong when argmax p ≠ argmax q: the same numbers as the
    one-hot target of those labels."""
    from PIL import Image

    pred, gt = folders
    soft, hard_dir = tmp_path / "soft", tmp_path / "hard"
    soft.mkdir()
    hard_dir.mkdir()
    for f in sorted(gt.glob("*.png")):
        y = np.minimum(np.asarray(Image.open(f)), 4)  # no ignored pixels in a soft target
        Image.fromarray(y).save(hard_dir / f.name)
        q = np.full((*y.shape, 5), 0.05, np.float32)
        np.put_along_axis(q, y[..., None].astype(int), 0.8, axis=-1)
        np.save(soft / f"{f.stem}.npy", q)
    hard = evaluate(pred, hard_dir, uncertainty=("entropy",)).summary()
    soft_run = evaluate(pred, soft, uncertainty=("entropy",), soft_gt=True).summary()
    assert hard["n_valid"] == soft_run["n_valid"]
    for key in ("auroc_entropy_pooled", "aurc_entropy_pooled", "ueo_entropy_pooled"):
        assert soft_run["dataset"][key] == pytest.approx(hard["dataset"][key], rel=1e-12)


def test_jobs_do_not_change_the_numbers(folders):
    pred, gt = folders
    one = evaluate(pred, gt, uncertainty=("entropy",), jobs=1).summary()
    two = evaluate(pred, gt, uncertainty=("entropy",), jobs=2).summary()
    assert one["dataset"] == pytest.approx(two["dataset"], nan_ok=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qc-threshold", "0.3"], "--qc-threshold needs --uncertainty SCORE"),
        (["--uncertainty", "entropy", "--qc-threshold", "1.5"], "--qc-threshold must be in [0, 1]"),
        (["--risk-coverage", "rc.png"], "--risk-coverage needs --uncertainty SCORE"),
        (["--uncertainty", "entropy", "--risk-coverage", "rc.jpg"], "the plot is a PNG"),
    ],
)
def test_bad_options_are_one_line_exit_2(folders, tmp_path, args, message):
    pred, gt = folders
    args = [str(tmp_path / a) if a.startswith("rc.") else a for a in args]
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt), *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not list(tmp_path.glob("rc.*"))
