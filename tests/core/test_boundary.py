"""Boundary metrics (--boundary) against slow references of their definitions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klseg_cli.core import boundary as bd

scipy_ndimage = pytest.importorskip("scipy.ndimage")
from scipy.spatial.distance import cdist  # noqa: E402


def _surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Physical coordinates of the surface voxels: the mask minus its erosion by the cross
    element, outside the image counting as background (scipy, not klseg's slicing)."""
    eroded = scipy_ndimage.binary_erosion(mask, border_value=0)
    return np.argwhere(mask & ~eroded) * np.asarray(spacing, dtype=np.float64)


def reference_distances(gt, pred, spacing):
    """All surface-point pairs: (d(pred → gt), d(gt → pred))."""
    sg, sp = _surface_points(gt, spacing), _surface_points(pred, spacing)
    pairs = cdist(sp, sg)
    return pairs.min(axis=1), pairs.min(axis=0)


def reference_metrics(gt, pred, spacing, tau):
    d_pg, d_gp = reference_distances(gt, pred, spacing)
    both = np.concatenate([d_pg, d_gp])
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    return hd95, both.mean(), np.mean(both <= tau * (1 + 1e-6))


def reference_band(mask, spacing, d):
    """Voxels of ``mask`` within distance d of a voxel outside it (outside the image too):
    the minimum over every background voxel of a one-voxel padded copy."""
    padded = np.pad(mask, 1)
    inside = np.argwhere(padded) * np.asarray(spacing, dtype=np.float64)
    outside = np.argwhere(~padded) * np.asarray(spacing, dtype=np.float64)
    near = cdist(inside, outside).min(axis=1) <= d * (1 + 1e-6)
    band = np.zeros_like(padded)
    band[tuple(np.argwhere(padded)[near].T)] = True
    return band[tuple(slice(1, -1) for _ in range(mask.ndim))]


def reference_biou(gt, pred, spacing, d):
    bg, bp = reference_band(gt, spacing, d), reference_band(pred, spacing, d)
    return (bg & bp).sum() / (bg | bp).sum()


def _blobs(rng, shape, k=3):
    """A random mask of a few boxes and noise, some touching the image border."""
    mask = rng.random(shape) < 0.08
    for _ in range(k):
        lo = [rng.integers(0, n - 2) for n in shape]
        hi = [min(n, a + rng.integers(2, max(3, n // 2))) for a, n in zip(lo, shape)]
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


@pytest.mark.parametrize("path", ["kdtree", "edt"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "shape,spacing",
    [((24, 30), (1.0, 1.0)), ((20, 26), (0.7, 1.9)), ((10, 12, 9), (0.8, 1.0, 2.5))],
)
def test_distances_match_all_pairs_reference(seed, shape, spacing, path, monkeypatch):
    # both ways of finding surface distances: a k-d tree, or distance transforms
    monkeypatch.setattr(bd, "KDTREE_VOXELS_PER_POINT", 0 if path == "kdtree" else 10**9)
    rng = np.random.default_rng(seed)
    gt = np.zeros((shape[0] + 8, *shape[1:]), dtype=bool)  # room: the crop must be exact
    pred = np.zeros_like(gt)
    gt[4:-4] = _blobs(rng, shape)
    pred[4:-4] = _blobs(rng, shape)
    pred[4:-4] |= gt[4:-4] & (rng.random(shape) < 0.5)
    tau = 1.5 * min(spacing)
    d = 2.0 * max(spacing)
    hd95, assd, nsd, biou = bd.class_metrics(gt, pred, spacing, tolerance=tau, width=d)
    r_hd95, r_assd, r_nsd = reference_metrics(gt, pred, spacing, tau)
    assert hd95 == pytest.approx(r_hd95, rel=1e-6)
    assert assd == pytest.approx(r_assd, rel=1e-6)
    assert nsd == pytest.approx(r_nsd, abs=1e-12)
    assert biou == pytest.approx(reference_biou(gt, pred, spacing, d), abs=1e-12)


def test_symmetric_in_target_and_prediction():
    rng = np.random.default_rng(7)
    a, b = _blobs(rng, (30, 30)), _blobs(rng, (30, 30))
    kw = dict(tolerance=1.0, width=2.0)
    assert bd.class_metrics(a, b, (1.0, 1.3), **kw) == pytest.approx(
        bd.class_metrics(b, a, (1.0, 1.3), **kw)
    )


def test_identical_masks():
    rng = np.random.default_rng(3)
    m = _blobs(rng, (16, 16, 16))
    assert bd.class_metrics(m, m, (1, 1, 1), tolerance=0.0, width=1.0) == (0.0, 0.0, 1.0, 1.0)


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return r2 <= radius**2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)])
def test_concentric_spheres_every_distance_is_k(spacing):
    """Spheres of radii r and r + k (physical units): every surface distance is k, up to
    the voxelisation of the two surfaces (half a voxel each)."""
    r, k = 14.0, 4.0
    shape = (48, 48, 28)
    centre = (24, 24, 14)
    gt, pred = _ball(shape, centre, r, spacing), _ball(shape, centre, r + k, spacing)
    step = max(spacing)
    hd95, assd, nsd, _ = bd.class_metrics(gt, pred, spacing, tolerance=k + step, width=2)
    assert abs(assd - k) <= step
    assert abs(hd95 - k) <= 1.5 * step
    assert nsd == 1.0
    _, _, nsd_tight, _ = bd.class_metrics(gt, pred, spacing, tolerance=k - 2 * step, width=2)
    assert nsd_tight < 0.2


def test_empty_class_policy():
    empty = np.zeros((8, 8), dtype=bool)
    some = empty.copy()
    some[2:5, 3:6] = True
    kw = dict(tolerance=1.0, width=1.0)
    assert all(math.isnan(v) for v in bd.class_metrics(empty, empty, (1, 1), **kw))
    assert bd.class_metrics(some, empty, (1, 1), **kw) == (math.inf, math.inf, 0.0, 0.0)
    assert bd.class_metrics(empty, some, (1, 1), **kw) == (math.inf, math.inf, 0.0, 0.0)


def test_defaults_follow_spacing_and_diagonal():
    opts = bd.BoundaryOptions()
    assert bd.tolerance_for(opts, (0.8, 0.8, 2.5)) == 0.8
    assert bd.width_for(opts, (300, 400), (1.0, 1.0)) == pytest.approx(10.0)
    assert bd.width_for(opts, (10, 10), (1.0, 3.0)) == 3.0  # never under one voxel step
    assert bd.width_for(bd.BoundaryOptions(width=4.5), (10, 10), (1, 1)) == 4.5


def test_scipy_and_edt_agree():
    edt = pytest.importorskip("edt")
    rng = np.random.default_rng(11)
    m = ~_blobs(rng, (20, 24, 12))
    a = scipy_ndimage.distance_transform_edt(m, sampling=(0.7, 1.0, 2.5))
    b = edt.edt(m, anisotropy=(0.7, 1.0, 2.5), black_border=False)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --- through evaluate ---------------------------------------------------------------------


def _write_pair(folder, rng, stem, shape=(40, 50), C=3, *, drop_class=None):
    (folder / "pred").mkdir(exist_ok=True)
    (folder / "gt").mkdir(exist_ok=True)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[5:20, 8:30] = 1
    labels[22:35, 20:45] = 2
    labels[0, :] = 255  # ignored row
    logits = rng.normal(size=(C, *shape)).astype(np.float32)
    logits[
        np.where(labels == 255, 0, labels), np.arange(shape[0])[:, None], np.arange(shape[1])
    ] += 2.5
    if drop_class is not None:
        logits[drop_class] -= 50
    p = np.exp(logits - logits.max(axis=0))
    p /= p.sum(axis=0)
    np.save(folder / "pred" / f"{stem}.npy", p.astype(np.float32))
    np.save(folder / "gt" / f"{stem}.npy", labels)
    return p, labels


def test_evaluate_boundary_matches_class_metrics(tmp_path):
    from klseg_cli.engine.local import evaluate

    rng = np.random.default_rng(0)
    p, labels = _write_pair(tmp_path, rng, "a")
    _write_pair(tmp_path, rng, "b", drop_class=2)
    opts = bd.BoundaryOptions(spacing=(1.0, 0.5))
    result = evaluate(tmp_path / "pred", tmp_path / "gt", boundary=opts, jobs=1)
    summary = result.summary()
    valid = labels != 255
    pred = np.argmax(p, axis=0)
    tau = bd.tolerance_for(opts, (1.0, 0.5))
    d = bd.width_for(opts, labels.shape, (1.0, 0.5))
    rows = {(r["image"], r["class_id"]): r for r in result.image_class_rows()}
    for c in range(3):
        want = bd.class_metrics(
            labels == c, (pred == c) & valid, (1.0, 0.5), tolerance=tau, width=d
        )
        got = tuple(rows[("a", c)][m] for m in bd.BOUNDARY_METRICS)
        assert got == pytest.approx(want)
    assert rows[("b", 2)]["hd95"] == math.inf and rows[("b", 2)]["nsd"] == 0.0
    image_a = next(r for r in summary["images"] if r["image"] == "a")
    assert image_a["nsd"] == pytest.approx(np.mean([rows[("a", c)]["nsd"] for c in range(3)]))
    ds = summary["dataset"]
    assert ds["hd95_image_mean"] == math.inf  # image b misses class 2 entirely
    assert ds["nsd_image_mean"] == pytest.approx(np.mean([r["nsd"] for r in summary["images"]]))
    assert summary["classes"][1]["biou"] == pytest.approx(
        np.mean([rows[("a", 1)]["biou"], rows[("b", 1)]["biou"]])
    )
    assert summary["settings"]["boundary"]["spacing"] == [1.0, 0.5]


def test_cli_boundary_report_and_requirement(tmp_path):
    from typer.testing import CliRunner

    from klseg_cli.cli.root import app

    rng = np.random.default_rng(1)
    _write_pair(tmp_path, rng, "a")
    _write_pair(tmp_path, rng, "b")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "-o", str(out),
         "--require", "nsd_image_mean >= 0.5", "--require", "hd95_image_mean <= 1000",
         "--nsd-tolerance", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    header = (out / "per_image.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["hd95", "assd", "nsd", "biou"]
    assert "biou" in (out / "per_class.csv").read_text().splitlines()[0]
    assert "hd95" in (out / "per_image_class.csv").read_text().splitlines()[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["boundary"]["nsd_tolerance"] == 2.0
    assert set(bd.dataset_names()) <= set(summary["dataset"])
    # without boundary metrics, the reports keep their columns
    plain = CliRunner().invoke(
        app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "-o", str(tmp_path / "p")]
    )
    assert plain.exit_code == 0, plain.output
    assert "hd95" not in (tmp_path / "p" / "per_image.csv").read_text()


def test_boundary_names_are_dataset_keys():
    from klseg_cli.commands.requirements import check_names, dataset_keys

    assert set(bd.dataset_names()) <= set(dataset_keys())
    check_names(["biou_image_mean >= 0.5"])


def test_baseline_with_other_boundary_settings_is_refused(tmp_path):
    from typer.testing import CliRunner

    from klseg_cli.cli.root import app

    rng = np.random.default_rng(2)
    _write_pair(tmp_path, rng, "a")
    base = tmp_path / "base"
    args = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--boundary", "-o", str(base)]).exit_code == 0
    baseline = ["--baseline", str(base / "summary.json")]
    res = runner.invoke(app, [*args, *baseline, "--boundary", "--nsd-tolerance", "3",
                              "--require", "nsd_image_mean >= baseline - 0.5"])  # fmt: skip
    assert res.exit_code == 2 and "boundary:" in res.output
    res = runner.invoke(app, [*args, *baseline, "--require", "miou_pooled >= baseline - 0.1"])
    assert res.exit_code == 0, res.output  # without --boundary now: nothing to compare


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    perm=st.permutations([0, 1, 2]),
    flip=st.integers(0, 2),
    spacing=st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 2.5])] * 3),
)
def test_invariant_under_axis_permutation_and_flips(seed, perm, flip, spacing):
    """Boundary metrics depend on geometry only: permuting the axes (with their spacing) or
    mirroring an axis changes no value (the axis order of NIfTI vs .npy must not matter)."""
    rng = np.random.default_rng(seed)
    gt, pred = _blobs(rng, (9, 8, 7), k=2), _blobs(rng, (9, 8, 7), k=2)
    kw = dict(tolerance=1.2, width=2.0)
    want = bd.class_metrics(gt, pred, spacing, **kw)
    moved = [np.flip(np.transpose(m, perm), axis=flip) for m in (gt, pred)]
    got = bd.class_metrics(*moved, tuple(spacing[a] for a in perm), **kw)
    assert got == pytest.approx(want, rel=1e-6, nan_ok=True)


def test_bootstrap_image_means_keep_inf_to_the_resamples_that_drew_it():
    from klseg_cli.core.bootstrap import weighted_means

    values = np.array([[1.0], [np.inf], [3.0], [np.nan]])
    W = np.array([[1, 0, 1, 1], [0, 2, 1, 0], [2, 0, 0, 2], [0, 0, 0, 1]], dtype=np.float64)
    got = weighted_means(W, values)[:, 0]
    assert got[0] == 2.0 and got[1] == np.inf and got[2] == 1.0 and np.isnan(got[3])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--spacing", "1,1,1"], "--spacing has 3 values for its 2 spatial axes"),
        (["--spacing", "1,x"], "--spacing must be numbers separated by commas"),
        (["--nsd-tolerance", "-1"], "--nsd-tolerance must be a number ≥ 0"),
        (["--boundary-width", "0"], "--boundary-width must be a positive number"),
        (["--soft-gt"], "--boundary needs label targets"),
    ],
)
def test_cli_boundary_usage_errors(tmp_path, args, message):
    from typer.testing import CliRunner

    from klseg_cli.cli.root import app

    _write_pair(tmp_path, np.random.default_rng(4), "a")
    res = CliRunner().invoke(
        app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--boundary", *args]
    )
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_summary_json_keeps_inf_apart_from_undefined_and_gate_reads_it(tmp_path):
    """P15 #3: inf is written "inf" (null stays "undefined"); gate reads it back as inf."""
    from typer.testing import CliRunner

    from klseg_cli.cli.root import app

    rng = np.random.default_rng(0)
    _write_pair(tmp_path, rng, "a")
    _write_pair(tmp_path, rng, "b", drop_class=2)
    out = tmp_path / "report"
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"),
                              "--boundary", "--out", str(out), "--classes", "a,b,inf"])  # fmt: skip
    assert res.exit_code == 0, res.output
    text = (out / "summary.json").read_text()
    data = json.loads(text)  # valid JSON: no Infinity token
    assert "Infinity" not in text
    assert data["dataset"]["hd95_image_mean"] == "inf"
    assert data["classes"][2]["class_name"] == "inf"
    b = next(r for r in data["images"] if r["image"] == "b")
    assert b["hd95"] == "inf"
    assert "inf" in (out / "per_image.csv").read_text()
    res = runner.invoke(app, ["gate", str(out / "summary.json"),
                              "--require", "hd95_image_mean <= 10"])  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "undefined" not in res.output and "inf" in res.output
    res = runner.invoke(app, ["gate", str(out / "summary.json"), "--format", "json",
                              "--require", "hd95_image_mean <= 10",
                              "--require", "iou[inf] >= 0"])  # fmt: skip
    rows = json.loads(res.stdout)["requirements"]
    assert rows[0]["value"] == "inf" and not rows[0]["passed"]
    assert rows[1]["passed"]  # the class named "inf" is a name, not a number
    # against itself as a baseline: inf <= inf + 0 passes, and nothing is "undefined"
    res = runner.invoke(app, ["gate", str(out / "summary.json"), "--baseline",
                              str(out / "summary.json"), "--require",
                              "hd95_image_mean <= baseline + 0"])  # fmt: skip
    assert res.exit_code == 0, res.output


def test_read_infinities_leaves_names_and_nulls_alone():
    from klseg_cli.io.summaryfile import read_infinities

    data = read_infinities({
        "dataset": {"hd95_image_mean": "inf", "kl_pooled": None, "x": "-inf"},
        "classes": [{"class_name": "inf", "class_id": 0, "hd95": "inf", "iou": None}],
        "images": [{"image": "-inf", "hd95": "inf"}],
        "dataset_ci": {"hd95_image_mean": [1.0, "inf"]},
    })  # fmt: skip
    assert data["dataset"] == {"hd95_image_mean": math.inf, "kl_pooled": None, "x": -math.inf}
    assert data["classes"][0] == {"class_name": "inf", "class_id": 0, "hd95": math.inf,
                                  "iou": None}  # fmt: skip
    assert data["images"][0] == {"image": "-inf", "hd95": math.inf}
    assert data["dataset_ci"]["hd95_image_mean"] == [1.0, math.inf]
