"""Temperature scaling (klseg calibrate, evaluate --temperature) against known answers and an
independent float64 optimiser; the calibrated maps it writes; the holdout split."""

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.commands import calibrate as calibrate_mod
from klseg_cli.commands.calibrate import calibrate, load_temperature
from klseg_cli.core.calibration import split_holdout
from klseg_cli.engine.local import evaluate
from klseg_cli.errors import UsageError
from klseg_cli.render.formats import jsonable

runner = CliRunner()
C = 5
EPS = 1e-7


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_set(folder, rng, *, t_gen, kind="probs", layout="hwc", n_images=2, hw=(220, 240),
             ignore=0.1, fmt="npy"):  # fmt: skip
    """Maps softmax(z / t_gen) (or the logits z / t_gen) of calibrated logits z: labels are
    drawn from softmax(z), so the best temperature is 1 / t_gen. Returns the raw arrays."""
    pred, gt = folder / "pred", folder / "gt"
    pred.mkdir(parents=True)
    gt.mkdir(parents=True)
    h, w = hw
    arrays = []
    for i in range(n_images):
        z = rng.normal(0.0, 1.6, size=(h * w, C))
        z[:, i % C] += 1.0
        p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        labels = (rng.random((h * w, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
        labels[rng.random(h * w) < ignore] = 255
        zs = z / t_gen
        stored = zs if kind == "logits" else np.exp(zs - logsumexp(zs, axis=1, keepdims=True))
        stored = stored.reshape(h, w, C).astype(np.float32)
        if layout == "chw":
            stored = np.ascontiguousarray(stored.transpose(2, 0, 1))
        if fmt == "npz":
            np.savez(pred / f"img{i}.npz", probs=stored)
        else:
            np.save(pred / f"img{i}.npy", stored)
        np.save(gt / f"img{i}.npy", labels.reshape(h, w).astype(np.uint8))
        arrays.append((stored, labels))
    return pred, gt, arrays


def reference_temperature(arrays, kind, layout):
    """The exact optimum in float64 with SciPy's bounded scalar search (nothing shared)."""
    Ls, ys = [], []
    for stored, labels in arrays:
        a = stored.astype(np.float64)
        rows = a.reshape(-1, C) if layout == "hwc" else a.reshape(C, -1).T
        logp = rows - logsumexp(rows, axis=1, keepdims=True) if kind == "logits" else np.log(
            np.maximum(rows, EPS))  # fmt: skip
        logp = np.maximum(logp, math.log(EPS))
        keep = labels != 255
        Ls.append(logp[keep])
        ys.append(labels[keep])
    L, y = np.concatenate(Ls), np.concatenate(ys)
    Ly = L[np.arange(len(y)), y]

    def f(t):
        return np.sum(logsumexp(L / t, axis=1) - Ly / t)

    return minimize_scalar(f, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-10}).x


@pytest.mark.parametrize("t_gen", [1.7, 0.6])
@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_recovers_known_temperature(tmp_path, t_gen, kind, layout):
    rng = np.random.default_rng(7)
    pred, gt, arrays = make_set(tmp_path, rng, t_gen=t_gen, kind=kind, layout=layout)
    result = calibrate(pred, gt, input_kind=kind, chunk_pixels=5000)
    t = result.temperature
    assert t == pytest.approx(1.0 / t_gen, rel=0.01)
    # exact: the optimum over every valid pixel, not a sample's
    assert t == pytest.approx(reference_temperature(arrays, kind, layout), rel=1e-5)
    assert result.fit.n_valid == sum(int((lab != 255).sum()) for _, lab in arrays)
    assert result.fit.n_passes <= 6
    table = result.part("fit").table()
    assert table["kl"][1] < table["kl"][0]
    # a single temperature changes no argmax: accuracy and IoU stay exactly as they were
    assert table["accuracy"][0] == table["accuracy"][1]
    assert table["miou"][0] == table["miou"][1]


def test_result_does_not_depend_on_chunk_size(tmp_path):
    pred, gt, _ = make_set(tmp_path, np.random.default_rng(3), t_gen=0.6, hw=(60, 70))
    a = calibrate(pred, gt, chunk_pixels=777).temperature
    b = calibrate(pred, gt, chunk_pixels=1 << 15).temperature
    assert a == pytest.approx(b, rel=1e-6)


def test_smoothing_and_soft_targets_fit_the_kl_minimum(tmp_path):
    """With soft targets the objective is KL(q‖p_T); check against a float64 optimiser."""
    rng = np.random.default_rng(11)
    h, w = 40, 50
    pred, gt = tmp_path / "p", tmp_path / "g"
    pred.mkdir()
    gt.mkdir()
    z = rng.normal(0, 2, size=(h * w, C))
    q = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    p = np.exp(2 * z - logsumexp(2 * z, axis=1, keepdims=True))  # over-confident
    np.save(pred / "x.npy", p.reshape(h, w, C).astype(np.float32))
    np.save(gt / "x.npy", q.reshape(h, w, C).astype(np.float32))
    t = calibrate(pred, gt, soft_gt=True).temperature
    L = np.log(np.maximum(p.astype(np.float32).astype(np.float64), EPS))
    Q = q.astype(np.float32).astype(np.float64)

    def f(t):
        return np.sum(logsumexp(L / t, axis=1) - (Q * L).sum(axis=1) / t)

    ref = minimize_scalar(f, bounds=(0.1, 10), method="bounded", options={"xatol": 1e-10}).x
    assert t == pytest.approx(ref, rel=1e-5)
    assert t == pytest.approx(2.0, rel=0.02)
    res = run("calibrate", pred, gt, "--soft-gt", "--smoothing", "0", "--write", tmp_path / "w",
              "--out", tmp_path / "o")  # fmt: skip
    assert res.exit_code == 0, res.output
    after = json.loads((tmp_path / "o" / "calibration.json").read_text())["parts"]["fit"]["after"]
    again = jsonable(evaluate(tmp_path / "w", gt, soft_gt=True).summary()["dataset"])
    assert again == after["dataset"]
    # label smoothing: the objective is KL against the smoothed target
    labels = q.argmax(axis=1).reshape(h, w).astype(np.uint8)
    np.save(gt / "x.npy", labels)
    eps_ = 0.1
    t = calibrate(pred, gt, smoothing=eps_).temperature
    Qs = np.full((h * w, C), eps_ / C)
    Qs[np.arange(h * w), labels.reshape(-1)] += 1 - eps_
    ref = minimize_scalar(
        lambda t: np.sum(logsumexp(L / t, axis=1) - (Qs * L).sum(axis=1) / t),
        bounds=(0.1, 10), method="bounded", options={"xatol": 1e-10},
    ).x  # fmt: skip
    assert t == pytest.approx(ref, rel=1e-5)


def test_holdout_images_never_enter_the_fit(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    pred, gt, _ = make_set(tmp_path / "all", rng, t_gen=0.6, n_images=6, hw=(30, 40))
    seen = []
    real = calibrate_mod.PairData

    def spy(pairs, settings, read, **kw):
        seen.extend(p.stem for p in pairs)
        return real(pairs, settings, read, **kw)

    monkeypatch.setattr(calibrate_mod, "PairData", spy)
    result = calibrate(pred, gt, holdout=0.34, seed=4)
    fit_stems = {p.stem for p in result.part("fit").pairs}
    hold_stems = {p.stem for p in result.part("holdout").pairs}
    assert len(hold_stems) == 2 and len(fit_stems) == 4
    assert not fit_stems & hold_stems
    assert set(seen) == fit_stems
    # the same T as a fit on a folder holding only the fit images
    only = tmp_path / "only"
    (only / "pred").mkdir(parents=True)
    (only / "gt").mkdir()
    for stem in fit_stems:
        (only / "pred" / f"{stem}.npy").write_bytes((pred / f"{stem}.npy").read_bytes())
        (only / "gt" / f"{stem}.npy").write_bytes((gt / f"{stem}.npy").read_bytes())
    monkeypatch.setattr(calibrate_mod, "PairData", real)
    assert calibrate(only / "pred", only / "gt").temperature == result.temperature
    # seeded: the same split again, another seed another split
    assert split_holdout(list(range(10)), 0.3, 1) == split_holdout(list(range(10)), 0.3, 1)
    assert split_holdout(list(range(10)), 0.3, 1) != split_holdout(list(range(10)), 0.3, 2)


@pytest.mark.parametrize("kind,layout,fmt", [("probs", "hwc", "npy"), ("logits", "chw", "npy"),
                                             ("probs", "chw", "npz")])  # fmt: skip
def test_written_maps_give_exactly_the_printed_after_numbers(tmp_path, kind, layout, fmt):
    rng = np.random.default_rng(9)
    pred, gt, _ = make_set(tmp_path, rng, t_gen=0.6, kind=kind, layout=layout, hw=(40, 50),
                           fmt=fmt)  # fmt: skip
    out, maps = tmp_path / "calib", tmp_path / "maps"
    res = run("calibrate", pred, gt, "--input", kind, "--out", out, "--write", maps)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "calibration.json").read_text())
    after = data["parts"]["fit"]["after"]["dataset"]
    again = jsonable(evaluate(maps, gt, input_kind=kind).summary()["dataset"])
    assert again == after  # exactly
    # and what evaluate --temperature computes on the fly
    on_the_fly = evaluate(pred, gt, input_kind=kind, temperature=data["temperature"])
    assert jsonable(on_the_fly.summary()["dataset"]) == after
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("kl "))
    assert f"{after['kl_pooled']:.4f}" in line
    for src in sorted(pred.iterdir()):
        written = maps / src.name
        assert written.exists()
        if fmt == "npy":
            a, b = np.load(src), np.load(written)
            assert a.shape == b.shape and a.dtype == b.dtype
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_keeps_tiff_arrangement_and_two_d_maps(tmp_path):
    import tifffile

    rng = np.random.default_rng(2)
    pred, gt = tmp_path / "p", tmp_path / "g"
    pred.mkdir()
    gt.mkdir()
    h, w = 30, 20
    z = rng.normal(0, 3, size=(h * w, C))
    p = np.exp(z - logsumexp(z, axis=1, keepdims=True)).astype(np.float32)
    tifffile.imwrite(pred / "pages.tif", np.ascontiguousarray(p.T.reshape(C, h, w)),
                     photometric="minisblack", compression="zlib")  # fmt: skip
    tifffile.imwrite(pred / "samples.tif", p.reshape(h, w, C), photometric="minisblack",
                     planarconfig="contig")  # fmt: skip
    for stem in ("pages", "samples"):
        np.save(gt / f"{stem}.npy", rng.integers(0, C, size=(h, w)).astype(np.uint8))
    res = run("calibrate", pred, gt, "--write", tmp_path / "m", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    for stem in ("pages", "samples"):
        with (
            tifffile.TiffFile(pred / f"{stem}.tif") as a,
            tifffile.TiffFile(tmp_path / "m" / f"{stem}.tif") as b,
        ):
            assert len(a.pages) == len(b.pages)
            assert a.series[0].shape == b.series[0].shape
            assert a.pages[0].compression == b.pages[0].compression
    data = json.loads((tmp_path / "o" / "calibration.json").read_text())
    again = jsonable(evaluate(tmp_path / "m", gt).summary()["dataset"])
    assert again == data["parts"]["fit"]["after"]["dataset"]
    # a binary 2-D map, P(class 1)
    bp, bg = tmp_path / "bp", tmp_path / "bg"
    bp.mkdir()
    bg.mkdir()
    p1 = rng.random((h, w)).astype(np.float32)
    np.save(bp / "b.npy", p1)
    np.save(bg / "b.npy", (rng.random((h, w)) < p1**3).astype(np.uint8))
    res = run("calibrate", bp, bg, "--write", tmp_path / "bm", "--out", tmp_path / "bo")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "bo" / "calibration.json").read_text())
    assert np.load(tmp_path / "bm" / "b.npy").shape == (h, w)
    again = jsonable(evaluate(tmp_path / "bm", bg).summary()["dataset"])
    assert again == data["parts"]["fit"]["after"]["dataset"]


def test_write_never_replaces_existing_files(tmp_path):
    rng = np.random.default_rng(1)
    pred, gt, _ = make_set(tmp_path, rng, t_gen=1.0, hw=(10, 10), n_images=1)
    res = run("calibrate", pred, gt, "--write", pred)
    assert res.exit_code == 2
    assert "exists already" in res.stderr
    assert np.load(pred / "img0.npy").shape == (10, 10, C)


def test_holdout_output_and_sizes(tmp_path):
    rng = np.random.default_rng(4)
    pred, gt, _ = make_set(tmp_path, rng, t_gen=0.6, n_images=4, hw=(30, 30))
    res = run("calibrate", pred, gt, "--holdout", "0.5", "--seed", "3", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "fit: 2 images, holdout: 2 images" in res.stdout
    assert "holdout part: 2 images" in res.stdout
    data = json.loads((tmp_path / "o" / "calibration.json").read_text())
    assert set(data["parts"]) == {"fit", "holdout"}
    assert data["holdout"] == 0.5 and data["seed"] == 3
    assert data["n_passes"] == len(data["passes"]) >= 1
    assert data["passes"][-1]["temperature"] == pytest.approx(data["temperature"], rel=1e-3)
    assert not set(data["parts"]["fit"]["images"]) & set(data["parts"]["holdout"]["images"])
    for bad in ("0", "1", "1.5"):
        res = run("calibrate", pred, gt, "--holdout", bad)
        assert res.exit_code == 2 and "--holdout must be between 0 and 1" in res.stderr


def test_evaluate_temperature_option(tmp_path):
    rng = np.random.default_rng(6)
    pred, gt, _ = make_set(tmp_path, rng, t_gen=0.6, hw=(30, 30))
    res = run("calibrate", pred, gt, "--out", tmp_path / "o")
    assert res.exit_code == 0
    cal = tmp_path / "o" / "calibration.json"
    t = json.loads(cal.read_text())["temperature"]
    a = run("evaluate", pred, gt, "--temperature", cal, "--format", "json")
    b = run("evaluate", pred, gt, "--temperature", repr(t), "--format", "json")
    assert a.exit_code == 0 and a.stdout == b.stdout
    summary = json.loads(a.stdout)
    assert summary["settings"]["temperature"] == t
    # a baseline computed without the temperature is one with other settings
    base = tmp_path / "base.json"
    base.write_text(run("evaluate", pred, gt, "--format", "json").stdout)
    res = run("evaluate", pred, gt, "--temperature", cal, "--baseline", base, "--require",
              "kl_pooled <= baseline")  # fmt: skip
    assert res.exit_code == 2 and "temperature" in res.stderr
    res = run("evaluate", pred, gt, "--temperature", cal, "--baseline", base, "--require",
              "kl_pooled <= baseline", "--allow-settings-change")  # fmt: skip
    assert res.exit_code == 0, res.output  # calibrated KL is lower
    for bad in ("0", "-1", "nan", "abc", str(tmp_path / "base.json")):
        res = run("evaluate", pred, gt, "--temperature", bad)
        assert res.exit_code == 2, bad
        assert res.stderr.startswith("Error: ") and len(res.stderr.splitlines()) == 1


def test_load_temperature():
    assert load_temperature("1.5") == 1.5
    with pytest.raises(UsageError):
        load_temperature("0")


def test_kernel_is_not_used_with_a_temperature_or_views():
    from klseg_cli.core import _fast
    from klseg_cli.core.metrics import MetricSettings

    if not _fast.AVAILABLE:
        pytest.skip("numba not installed")
    assert _fast.supported(MetricSettings(num_classes=3), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3, temperature=1.5), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3, calibration_views=True), np.float32)


def test_temperature_with_kernel_sized_maps_matches_numpy(tmp_path):
    """A temperature sends even large maps to the NumPy path: accelerate=True changes nothing."""
    rng = np.random.default_rng(8)
    pred, gt, _ = make_set(tmp_path, rng, t_gen=0.6, hw=(20, 20), n_images=1)
    a = evaluate(pred, gt, temperature=1.3).summary()["dataset"]
    from klseg_cli.engine.local import plan

    job = plan(pred, gt, temperature=1.3)
    from klseg_cli.engine.image import uses_kernel
    from klseg_cli.io.readers import open_prediction

    pm = open_prediction(job.pairing.pairs[0].pred, hw=(20, 20))
    assert not uses_kernel(pm, job.settings, True)
    assert a["kl_pooled"] < evaluate(pred, gt).summary()["dataset"]["kl_pooled"]


@pytest.mark.parametrize("layout,fmt", [("hwc", "npy"), ("chw", "npy"), ("chw", "npz")])
def test_compiled_pass_gives_the_numpy_optimum(tmp_path, layout, fmt):
    """The compiled pass (maps in memory read in place, files chunk by chunk) finds the
    NumPy pass's temperature; a chunk with NaN under ignored pixels goes to NumPy."""
    from dataclasses import replace

    from klseg_cli.core import _fast_fit
    from klseg_cli.core.calibration import fit_temperature
    from klseg_cli.engine.fit import PairData
    from klseg_cli.engine.local import plan

    if not _fast_fit.AVAILABLE:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(12)
    pred, gt, arrays = make_set(tmp_path, rng, t_gen=0.6, layout=layout, fmt=fmt, hw=(90, 100))
    if fmt == "npy":  # NaN in a pixel that is ignored: the kernel refuses, NumPy computes
        stored, labels = arrays[0]
        k = int(np.flatnonzero(labels == 255)[0])
        if layout == "hwc":
            stored.reshape(-1, C)[k, 0] = np.nan
        else:
            stored.reshape(C, -1)[0, k] = np.nan
        np.save(pred / "img0.npy", stored)
    job = plan(pred, gt, chunk_pixels=4000)
    temps = []
    for accelerate in (False, True):
        read = replace(job.read, accelerate=accelerate)
        data = PairData(job.pairing.pairs, job.settings, read, n_pixels=2 * 90 * 100)
        temps.append(fit_temperature(data).temperature)
    assert temps[1] == pytest.approx(temps[0], rel=1e-6)
    assert temps[0] == pytest.approx(1 / 0.6, rel=0.02)


def test_compiled_chunk_sums_match_numpy(rng):
    from klseg_cli.core import _fast_fit
    from klseg_cli.core.calibration import chunk_objective, log_ptilde, target_terms
    from klseg_cli.core.metrics import MetricSettings

    from ..conftest import random_probs

    if not _fast_fit.AVAILABLE:
        pytest.skip("numba not installed")
    s = MetricSettings(num_classes=7)
    P = np.ascontiguousarray(random_probs(rng, 5000, 7, saturate=0.2).T)
    y = rng.integers(0, 7, 5000).astype(np.uint8)
    y[::10] = 255
    keep = y != 255
    L = log_ptilde(P[:, keep], s, 1e-3)
    qL, _ = target_terms(L, y[keep].astype(np.intp), s)
    for a in (0.05, 0.6, 1.0, 2.5, 30.0):
        ok, n, f, g, h = _fast_fit.chunk_sums(P, y, a, s, 1e-3)
        ref = chunk_objective(L, qL, a)
        assert ok and n == int(keep.sum())
        assert f == pytest.approx(ref[0], rel=2e-6)
        assert g == pytest.approx(ref[1], rel=2e-5, abs=1e-3)
        assert h == pytest.approx(ref[2], rel=5e-5)  # both within ~2e-5 of float64
    bad = P.copy()
    bad[0, 3] = -0.5
    assert not _fast_fit.chunk_sums(bad, y, 1.0, s, 1e-3)[0]


def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(13)
    pred, gt, _ = make_set(tmp_path, rng, t_gen=0.6, hw=(20, 20), n_images=3)
    out, maps = tmp_path / "o", tmp_path / "m"
    good = np.load(pred / "img2.npy")
    labels = np.load(gt / "img2.npy")
    for ignored in (False, True):
        bad = good.copy()
        r, c = np.argwhere((labels == 255) == ignored)[0]
        bad[r, c, 0] = 7.0  # not a probability: the fit fails, or (ignored) the writing
        np.save(pred / "img2.npy", bad)
        res = run("calibrate", pred, gt, "--out", out, "--write", maps)
        assert res.exit_code == 2
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
        assert len(errors) == 1 and "img2.npy: not a probability map" in errors[0]
        assert not out.exists() and not maps.exists()  # all or nothing
        assert ("pass 1" in res.stderr) == ignored  # the fit itself skips ignored pixels
    (tmp_path / "file").write_text("x")
    res = run("calibrate", pred, gt, "--out", tmp_path / "file")
    assert res.exit_code == 2 and "existing file" in res.stderr
    res = run("calibrate", pred, gt, "--write", tmp_path / "file")
    assert res.exit_code == 2 and "existing file" in res.stderr
