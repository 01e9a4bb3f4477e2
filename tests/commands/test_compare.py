"""klseg compare: per-pixel KL/JS against scipy, reductions against slow loops, the CLI."""

import json
import math

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.commands.compare import compare_models as compare
from klseg_cli.core.agreement import PairStats, pair_class_rows, pair_metrics, pair_terms
from klseg_cli.core.metrics import MetricSettings, prediction_terms
from klseg_cli.engine.local import evaluate

from ..conftest import random_probs

C = 4


def reference_pixels(a, b, eps):
    """Slow per-pixel reference: (n, C) float64 rows → KL(A‖B), KL(B‖A), JS."""
    kl_ab = np.maximum(rel_entr(a, np.maximum(b, eps)).sum(axis=1), 0.0)
    kl_ba = np.maximum(rel_entr(b, np.maximum(a, eps)).sum(axis=1), 0.0)
    js = np.array([jensenshannon(x, y) ** 2 for x, y in zip(a, b)])
    return kl_ab, kl_ba, js


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_pixel_terms_against_scipy(rng, dtype, eps):
    n = 3000
    a = random_probs(rng, n, C, saturate=0.2, dtype=np.float64)
    b = random_probs(rng, n, C, saturate=0.2, dtype=np.float64)
    b[:50] = a[:50]  # identical pixels: every divergence is 0
    a, b = a.astype(dtype), b.astype(dtype)
    settings = MetricSettings(num_classes=C, eps=eps)
    ta = prediction_terms(np.ascontiguousarray(a.T), settings, tolerance=1e-3)
    tb = prediction_terms(np.ascontiguousarray(b.T), settings, tolerance=1e-3)
    t = pair_terms(ta, tb, settings)
    ref = reference_pixels(a.astype(np.float64), b.astype(np.float64), eps)
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    for got, want in zip((t.kl_ab, t.kl_ba, t.js), ref):
        np.testing.assert_allclose(got, want, **tol)
    assert np.all(t.js <= math.log(2) + 1e-6)
    assert np.all(t.kl_ab[:50] <= 1e-5) and np.all(t.js[:50] <= 1e-6)
    assert np.array_equal(t.pred_a, a.argmax(axis=1)) and np.array_equal(t.pred_b, b.argmax(1))
    assert t.n_clipped_ab == int(np.count_nonzero((b < eps) & (a > 0)))


def test_kl_stays_finite_where_one_model_rules_a_class_out(rng):
    a = np.array([[0.5, 0.5, 0.0, 0.0]])
    b = np.array([[1.0, 0.0, 0.0, 0.0]])
    settings = MetricSettings(num_classes=C, eps=1e-7)
    t = pair_terms(prediction_terms(a.T.copy(), settings), prediction_terms(b.T.copy(), settings),
                   settings)  # fmt: skip
    assert t.kl_ab[0] == pytest.approx(0.5 * math.log(0.5 / 1.0) + 0.5 * math.log(0.5 / 1e-7))
    assert t.kl_ba[0] == pytest.approx(math.log(1.0 / 0.5))
    assert t.n_clipped_ab == 1


def test_logits_give_the_probabilities_numbers(rng):
    z = rng.normal(0, 3, size=(C, 500))
    p = np.exp(z - z.max(0))
    p /= p.sum(0)
    q = random_probs(rng, 500, C, dtype=np.float64).T.copy()
    s_p = MetricSettings(num_classes=C)
    s_l = MetricSettings(num_classes=C, input_kind="logits")
    from_probs = pair_terms(prediction_terms(p, s_p), prediction_terms(q, s_p), s_p)
    from_logits = pair_terms(prediction_terms(z, s_l), prediction_terms(np.log(q), s_l), s_l)
    np.testing.assert_allclose(from_logits.kl_ab, from_probs.kl_ab, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(from_logits.js, from_probs.js, rtol=1e-9, atol=1e-12)


def write_model(folder, maps, layout="hwc", fmt="npy"):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, p in maps.items():
        if fmt == "npz":
            np.savez_compressed(folder / f"{stem}.npz", probs=p)
        elif layout == "chw":
            chw = np.ascontiguousarray(p.transpose(2, 0, 1))
            tifffile.imwrite(folder / f"{stem}.tif", chw, photometric="minisblack")
        else:
            np.save(folder / f"{stem}.npy", p)


@pytest.fixture
def two_models(tmp_path, rng):
    """Models A (.npy HWC) and B (.tif CHW) of three images, and targets with ignore pixels."""
    shapes = {"x": (20, 30), "y": (17, 23), "z": (25, 12)}
    maps_a, maps_b, labels = {}, {}, {}
    for stem, (h, w) in shapes.items():
        maps_a[stem] = random_probs(rng, h * w, C, saturate=0.3).reshape(h, w, C)
        maps_b[stem] = random_probs(rng, h * w, C, saturate=0.3).reshape(h, w, C)
        lab = rng.integers(0, C, size=(h, w)).astype(np.uint8)
        lab[:2] = 255
        labels[stem] = lab
    write_model(tmp_path / "a", maps_a)
    write_model(tmp_path / "b", maps_b, layout="chw")
    (tmp_path / "gt").mkdir()
    for stem, lab in labels.items():
        Image.fromarray(lab).save(tmp_path / "gt" / f"{stem}.png")
    return tmp_path, maps_a, maps_b, labels


def test_compare_reductions_against_a_slow_reference(two_models):
    root, maps_a, maps_b, _ = two_models
    res = compare(root / "a", root / "b")
    summary = res.summary()
    allpix = {k: [] for k in ("kl_ab", "kl_ba", "js", "agree", "pa", "pb")}
    for row in summary["images"]:
        a = maps_a[row["image"]].reshape(-1, C).astype(np.float64)
        b = maps_b[row["image"]].reshape(-1, C).astype(np.float64)
        kl_ab, kl_ba, js = reference_pixels(a, b, 1e-7)
        agree = a.argmax(1) == b.argmax(1)
        assert row["kl_ab"] == pytest.approx(kl_ab.mean(), rel=1e-5)
        assert row["kl_ba"] == pytest.approx(kl_ba.mean(), rel=1e-5)
        assert row["js"] == pytest.approx(js.mean(), rel=1e-5)
        assert row["agreement"] == pytest.approx(agree.mean(), rel=1e-12)
        for k, v in zip(allpix, (kl_ab, kl_ba, js, agree, a.argmax(1), b.argmax(1))):
            allpix[k].append(v)
    cat = {k: np.concatenate(v) for k, v in allpix.items()}
    d = summary["dataset"]
    assert d["kl_ab_pooled"] == pytest.approx(cat["kl_ab"].mean(), rel=1e-5)
    assert d["js_pooled"] == pytest.approx(cat["js"].mean(), rel=1e-5)
    assert d["agreement_pooled"] == pytest.approx(cat["agree"].mean(), rel=1e-12)
    assert d["kl_ab_image_mean"] == pytest.approx(
        np.mean([r["kl_ab"] for r in summary["images"]]), rel=1e-12
    )
    for row in summary["classes"]:
        c = row["class_id"]
        in_a, in_b = cat["pa"] == c, cat["pb"] == c
        assert row["agreement_iou"] == pytest.approx((in_a & in_b).sum() / (in_a | in_b).sum())
        assert row["kl_ab"] == pytest.approx(cat["kl_ab"][in_a].mean(), rel=1e-5)
    assert summary["n_valid"] == sum(h * w for h, w, _ in (m.shape for m in maps_a.values()))


def test_with_targets_models_match_evaluate_and_ignore_pixels_count_nowhere(two_models):
    root, _, _, labels = two_models
    summary = compare(root / "a", root / "b", root / "gt").summary(n_resamples=200, seed=1)
    eval_a = evaluate(root / "a", root / "gt").summary()["dataset"]
    eval_b = evaluate(root / "b", root / "gt").summary()["dataset"]
    for k, v in eval_a.items():
        assert summary["models"]["a"][k] == pytest.approx(v, nan_ok=True)
        assert summary["models"]["b"][k] == pytest.approx(eval_b[k], nan_ok=True)
        assert summary["delta"][k] == pytest.approx(eval_b[k] - v, nan_ok=True)
    n_valid = sum(int((lab != 255).sum()) for lab in labels.values())
    assert summary["n_valid"] == n_valid
    lo, hi = summary["delta_ci"]["miou_image_mean"]
    assert lo <= summary["delta"]["miou_image_mean"] <= hi
    assert set(summary["dataset_ci"]) == set(summary["dataset"])
    worst = summary["worst"]
    assert [w["delta_kl"] for w in worst] == sorted((w["delta_kl"] for w in worst), reverse=True)
    row = summary["images"][0]
    assert row["delta_miou"] == pytest.approx(row["b_miou"] - row["a_miou"])


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_reports_and_gates(two_models):
    root = two_models[0]
    out = root / "cmp"
    gates = ("--require", "js_pooled <= 1", "--require", "delta(miou_image_mean) >= -1")
    res = run("compare", root / "a", root / "b", root / "gt", "--out", out, "--bootstrap", 100,
              *gates)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.json"]
    lines = (out / "compare.csv").read_text().splitlines()
    assert lines[0].startswith("image,height,width,n_valid,kl_ab,kl_ba,js,agreement,")
    assert "delta_miou" in lines[0] and len(lines) == 4
    data = json.loads((out / "compare.json").read_text())
    assert [r["passed"] for r in data["requirements"]] == [True, True]
    res = run("compare", root / "a", root / "b", "--require", "js_pooled <= 0.0001")
    assert res.exit_code == 1
    assert "FAIL" in res.stdout


def test_cli_jobs_give_identical_results(two_models):
    root = two_models[0]
    outs = [
        run("compare", root / "a", root / "b", root / "gt", "--format", "json",
            "--bootstrap", 50, "--jobs", j).stdout
        for j in (1, 2)
    ]  # fmt: skip
    assert json.loads(outs[0]) == json.loads(outs[1])


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--require", "iou[0] > 0.5"), "compare checks data-set names only"),
        (("--require", "delta(miou_pooled) >= 0"), "delta() compares the models' metrics"),
        (("--require", "nope_pooled < 1"), "unknown name 'nope_pooled'"),
        (("--require", "js_pooled <= baseline"), "compare has no baseline"),
    ],
)
def test_cli_usage_errors(two_models, extra, message):
    root = two_models[0]
    res = run("compare", root / "a", root / "b", *extra)
    assert res.exit_code == 2
    assert message in res.output


def test_cli_input_errors_name_the_file(two_models, rng):
    root = two_models[0]
    (root / "b" / "y.tif").unlink()
    res = run("compare", root / "a", root / "b")
    assert res.exit_code == 2
    assert "1 maps of A have no map of B with the same stem (y.npy)" in res.output
    res = run("compare", root / "a", root / "b", "--allow-missing", "--format", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_images"] == 2
    bad = random_probs(rng, 20 * 31, C).reshape(20, 31, C)
    write_model(root / "bad", {"x": bad})
    res = run("compare", root / "a" / "x.npy", root / "bad" / "x.npy")
    assert res.exit_code == 2
    assert "bad/x.npy" in res.output
    notprob = np.full((20, 30, C), 0.5, np.float32)
    write_model(root / "np", {"x": notprob})
    res = run("compare", root / "a" / "x.npy", root / "np" / "x.npy")
    assert res.exit_code == 2
    assert "np/x.npy: not a probability map" in res.output


def test_heatmap_against_draws_the_per_pixel_divergence(two_models):
    root, maps_a, maps_b, _ = two_models
    png, tif = root / "x_js.png", root / "x_js.tif"
    res = run("heatmap", root / "a" / "x.npy", "--against", root / "b" / "x.tif",
              "--metric", "js", "-o", png, "--raw", tif)  # fmt: skip
    assert res.exit_code == 0, res.output
    a, b = maps_a["x"].reshape(-1, C), maps_b["x"].reshape(-1, C)
    _, _, js = reference_pixels(a.astype(np.float64), b.astype(np.float64), 1e-7)
    np.testing.assert_allclose(tifffile.imread(tif).reshape(-1), js, rtol=1e-4, atol=2e-5)
    assert Image.open(png).size == (30, 20)
    res = run("heatmap", root / "a", "--against", root / "b", "-o", root / "maps",
              "--metric", "error")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (root / "maps").iterdir()) == [
        "x_error.png", "y_error.png", "z_error.png"
    ]  # fmt: skip
    res = run("heatmap", root / "a", root / "gt", "--against", root / "b")
    assert res.exit_code == 2 and "no GT" in res.output
    res = run("heatmap", root / "a", "--against", root / "b", "--metric", "entropy")
    assert res.exit_code == 2 and "--against draws" in res.output


def test_pair_stats_merge_and_class_rows():
    settings = MetricSettings(num_classes=3)
    s = PairStats.zeros(3)
    s.confusion = np.array([[5, 1, 0], [0, 4, 0], [0, 0, 0]])
    s.sums = np.array([1.0, 2.0, 0.5])
    s.class_sums = np.array([[0.6, 0.4, 0.0], [1.0, 1.0, 0.0], [0.3, 0.2, 0.0]])
    total = s + s
    m = pair_metrics(total, settings)
    assert m["agreement"] == pytest.approx(18 / 20)
    assert m["kl_ab"] == pytest.approx(2.0 / 20)
    rows = pair_class_rows(total, settings)
    assert rows[0]["agreement_iou"] == pytest.approx(10 / 12)
    assert math.isnan(rows[2]["agreement_iou"])  # neither model predicts class 2
    assert m["agreement_miou"] == pytest.approx((10 / 12 + 8 / 10) / 2)
