"""mce, ece_adaptive, ece_classwise, ece_boundary/interior against slow, obvious references;
the reliability files; requirements on the new names."""

import csv
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.commands.requirements import check_names
from klseg_cli.core.calibration_views import FINE_BINS, boundary_band, fine_bin_index
from klseg_cli.core.stats import Stats
from klseg_cli.engine.local import evaluate

from ..conftest import random_probs

C = 4
BINS = 15
runner = CliRunner()


def make_blocks(tmp_path, rng, shapes=((23, 31), (17, 40), (30, 9))):
    """Random maps; labels in rectangles (so there are boundaries and interiors), agreeing
    with the argmax 70% of the time, some ignored pixels."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    data = []
    for i, (h, w) in enumerate(shapes):
        p = random_probs(rng, h * w, C, sharp=1.5)
        lab = np.zeros((h, w), dtype=np.int64)
        for _ in range(5):
            r0, c0 = rng.integers(0, h), rng.integers(0, w)
            lab[r0 : r0 + rng.integers(3, 12), c0 : c0 + rng.integers(3, 12)] = rng.integers(C)
        flat = lab.reshape(-1)
        agree = rng.random(h * w) < 0.7
        order = np.argsort(-p, axis=1)
        for k in np.flatnonzero(agree):  # swap the largest probability onto the label
            j = order[k, 0]
            p[k, [j, flat[k]]] = p[k, [flat[k], j]]
        flat[rng.random(h * w) < 0.08] = 255
        np.save(pred / f"m{i}.npy", p.reshape(h, w, C))
        np.save(gt / f"m{i}.npy", lab.astype(np.uint8))
        data.append((p, lab))
    return pred, gt, data


def ref_bins(conf, hit, bins=BINS):
    """(count, Σconf, Σhit) per bin ((b−1)/B, b/B], 0 in the first bin: plain loops."""
    count, sconf, shit = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for c, h in zip(conf.tolist(), hit.tolist()):
        b = 0
        while b < bins - 1 and not (c * bins <= b + 1):
            b += 1
        count[b] += 1
        sconf[b] += c
        shit[b] += h
    return count, sconf, shit


def ref_ece(count, sconf, shit):
    n = count.sum()
    return sum(abs(shit[b] - sconf[b]) for b in range(len(count)) if count[b]) / n


def ref_mce(count, sconf, shit):
    return max(abs(shit[b] / count[b] - sconf[b] / count[b]) for b in range(len(count))
               if count[b])  # fmt: skip


def ref_fine_bin(conf: float) -> int:
    u = float(np.float32(1.0 - conf))
    if u < 2.0**-24:
        return 0
    _, e = math.frexp(u)  # u = m·2^e, m in [0.5, 1)
    octave = e - 1 + 24
    sub = int((u / 2.0 ** (e - 1) - 1.0) * 32)
    return min(1 + octave * 32 + sub, FINE_BINS - 1)


def ref_adaptive(conf, hit, bins=BINS):
    ks = np.array([ref_fine_bin(c) for c in conf.tolist()])
    n = len(conf)
    groups = {}
    for k in sorted(set(ks.tolist()), reverse=True):  # by increasing confidence
        groups[k] = np.flatnonzero(ks == k)
    before = 0
    count, sconf, shit = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for idx in groups.values():
        j = min(bins - 1, (bins * before) // n)
        count[j] += len(idx)
        sconf[j] += conf[idx].sum()
        shit[j] += hit[idx].sum()
        before += len(idx)
    return ref_ece(count, sconf, shit)


def ref_band(lab, k):
    h, w = lab.shape
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            if not 0 <= lab[i, j] < C:
                continue
            win = lab[max(0, i - k) : i + k + 1, max(0, j - k) : j + k + 1]
            win = win[(win >= 0) & (win < C)]
            out[i, j] = bool((win != lab[i, j]).any())
    return out


@pytest.mark.parametrize("band", [1, 3])
def test_views_match_slow_references(tmp_path, rng, band):
    pred, gt, data = make_blocks(tmp_path, rng)
    res = evaluate(pred, gt, calibration_views=True, boundary_band=band, chunk_pixels=47)
    d = res.summary()["dataset"]
    P = np.concatenate([p for p, _ in data])
    y = np.concatenate([lab.reshape(-1) for _, lab in data])
    in_band = np.concatenate([ref_band(lab, band).reshape(-1) for _, lab in data])
    keep = y != 255
    P, y, in_band = P[keep], y[keep], in_band[keep]
    conf = P.max(axis=1).astype(np.float64)
    hit = (P.argmax(axis=1) == y).astype(np.float64)
    bins = ref_bins(conf, hit)
    assert d["ece_pooled"] == pytest.approx(ref_ece(*bins), rel=1e-9)
    assert d["mce_pooled"] == pytest.approx(ref_mce(*bins), rel=1e-9)
    assert d["ece_adaptive_pooled"] == pytest.approx(ref_adaptive(conf, hit), rel=1e-9)
    per_class = [ref_ece(*ref_bins(P[:, c].astype(np.float64), (y == c).astype(float)))
                 for c in range(C)]  # fmt: skip
    assert d["ece_classwise_pooled"] == pytest.approx(np.mean(per_class), rel=1e-9)
    assert in_band.any() and (~in_band).any()
    assert d["ece_boundary_pooled"] == pytest.approx(
        ref_ece(*ref_bins(conf[in_band], hit[in_band])), rel=1e-9
    )
    assert d["ece_interior_pooled"] == pytest.approx(
        ref_ece(*ref_bins(conf[~in_band], hit[~in_band])), rel=1e-9
    )


def test_views_do_not_depend_on_chunks_and_merge(tmp_path, rng):
    pred, gt, _ = make_blocks(tmp_path, rng)
    a = evaluate(pred, gt, calibration_views=True, chunk_pixels=13)
    b = evaluate(pred, gt, calibration_views=True, chunk_pixels=1 << 15)
    for name in ("fine_count", "classwise_count", "classwise_hit", "band_count"):
        assert np.array_equal(getattr(a.total, name), getattr(b.total, name))
    da, db = a.summary()["dataset"], b.summary()["dataset"]
    for key in ("ece_adaptive_pooled", "ece_classwise_pooled", "ece_boundary_pooled"):
        assert da[key] == pytest.approx(db[key], rel=1e-12)
    st = a.total
    again = Stats.from_dict(json.loads(json.dumps(st.to_dict())))
    for name in st.__dataclass_fields__:
        a1, a2 = np.asarray(getattr(again, name)), np.asarray(getattr(st, name))
        assert np.array_equal(a1, a2, equal_nan=a1.dtype.kind == "f")


def test_views_are_nan_without_the_option_and_mce_always(tmp_path, rng):
    pred, gt, _ = make_blocks(tmp_path, rng)
    d = evaluate(pred, gt).summary()["dataset"]
    assert math.isfinite(d["mce_pooled"])
    for key in ("ece_adaptive_pooled", "ece_classwise_pooled", "ece_boundary_pooled",
                "ece_interior_pooled"):  # fmt: skip
        assert math.isnan(d[key])


def test_adaptive_is_close_to_exact_equal_mass_bins(rng):
    """The fine histogram's equal-mass bins against exact ones from a full sort."""
    n = 20000
    conf = np.sort(rng.uniform(0.3, 1.0, n)).astype(np.float32).astype(np.float64)
    hit = (rng.random(n) < conf**1.5).astype(np.float64)
    exact = sum(abs(h.sum() - c.sum()) for c, h in zip(np.array_split(conf, BINS),
                                                      np.array_split(hit, BINS))) / n  # fmt: skip
    assert ref_adaptive(conf, hit) == pytest.approx(exact, abs=0.005)


def test_fine_bins_and_band_edges():
    conf = np.array([1.0, 1 - 2**-25, 1 - 2**-24, 0.5, 0.25, 0.0, 1.0001], dtype=np.float32)
    k = fine_bin_index(conf)
    assert k.tolist() == [ref_fine_bin(float(c)) for c in conf.tolist()]
    assert k[0] == 0 and k[2] == 1 and k[5] == FINE_BINS - 1
    lab = np.array([[0, 0, 0, 1], [0, 0, 0, 1], [255, 0, 0, 1]])
    from klseg_cli.core.metrics import MetricSettings

    two = MetricSettings(num_classes=2)
    band = boundary_band(lab, 0, 12, 1, two).reshape(3, 4)
    assert band.tolist() == [[False, False, True, True], [False, False, True, True],
                             [False, False, True, True]]  # fmt: skip
    assert boundary_band(lab, 5, 10, 1, two).tolist() == band.reshape(-1)[5:10].tolist()


def test_reliability_outputs(tmp_path, rng):
    pred, gt, _ = make_blocks(tmp_path, rng)
    out, png = tmp_path / "rep", tmp_path / "rel.png"
    res = runner.invoke(app, ["evaluate", str(pred), str(gt), "--out", str(out),
                              "--reliability", str(png)])  # fmt: skip
    assert res.exit_code == 0, res.output
    from PIL import Image

    for path in (png, out / "reliability.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
    rows = list(csv.DictReader((out / "calibration.csv").open()))
    assert len(rows) == BINS
    total = evaluate(pred, gt).total
    assert [int(r["count"]) for r in rows] == total.ece_count.tolist()
    assert [int(r["correct_sum"]) for r in rows] == total.ece_correct.tolist()
    assert float(rows[-1]["upper"]) == 1.0


def test_requirements_on_the_new_names(tmp_path, rng):
    check_names(["mce_pooled < 1", "ece_adaptive_pooled <= 0.5", "ece_classwise_pooled < 1",
                 "ece_boundary_pooled < 1", "ece_interior_pooled < 1"])  # fmt: skip
    pred, gt, _ = make_blocks(tmp_path, rng)
    # naming a view turns the views on: the gate is computed, not "undefined"
    res = runner.invoke(app, ["evaluate", str(pred), str(gt), "--format", "json",
                              "--require", "ece_boundary_pooled < 5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["requirements"][0]["passed"]
    assert summary["settings"]["calibration_views"] is True
    res = runner.invoke(app, ["evaluate", str(pred), str(gt), "--require", "ece_bogus < 1"])
    assert res.exit_code == 2


def test_batched_formulas_match_view_metrics(tmp_path, rng):
    """The batched formulas (for resampling per-image sums) give view_metrics' numbers."""
    from dataclasses import fields

    from klseg_cli.core.calibration_views import view_metrics, view_metrics_batch

    pred, gt, _ = make_blocks(tmp_path, rng)
    res = evaluate(pred, gt, calibration_views=True)
    images = [img.stats for img in res.images]
    sets = [images[0], images[0] + images[1], images[0] + images[1] + images[2], images[2]]
    totals = {f.name: np.stack([getattr(s, f.name) for s in sets])
              for f in fields(images[0]) if f.name != "n_clipped"}  # fmt: skip
    batch = view_metrics_batch(totals, res.settings)
    for r, st in enumerate(sets):
        one = view_metrics(st, res.settings)
        for name, value in one.items():
            assert batch[name][r] == pytest.approx(value, rel=1e-12, nan_ok=True), name


def test_compiled_classwise_bins_equal_numpy(rng):
    """The numba loop for the class-wise bins gives NumPy's integers and sums."""
    from klseg_cli.core import _fast
    from klseg_cli.core.metrics import MetricSettings
    from klseg_cli.engine.image import image_stats
    from klseg_cli.io.readers import PredictionMap

    if not _fast.AVAILABLE:
        pytest.skip("numba not installed")
    h, w = 37, 53
    p = random_probs(rng, h * w, C, saturate=0.2).reshape(h, w, C)
    p[0, 0] = [1 / 15, 2 / 15, 0.4, 1 - 0.4 - 3 / 15]  # values on bin edges
    lab = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    lab[5] = 255
    pm = PredictionMap(path="x", array=p, layout="hwc")
    s = MetricSettings(num_classes=C, calibration_views=True)
    a = image_stats(pm, lab, s, chunk_pixels=300, accelerate=False)
    b = image_stats(pm, lab, s, chunk_pixels=300, accelerate=True)
    assert np.array_equal(a.classwise_count, b.classwise_count)
    assert np.array_equal(a.classwise_hit, b.classwise_hit)
    assert np.allclose(a.classwise_prob, b.classwise_prob, rtol=1e-12)
