"""Data-set label conventions (#10): ignore values inside the class range, label maps,
reduce-zero-label, class subsets in the means; and the precision of confident pixels."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy.special import rel_entr
from typer.testing import CliRunner

import klseg_cli
from klseg_cli.cli.root import app
from klseg_cli.core import _fast
from klseg_cli.core.labels import (
    BAD,
    CITYSCAPES_TRAIN_IDS,
    IGNORED,
    LabelSpec,
    load_label_map,
)
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.core.stats import class_metrics, pixel_metrics
from klseg_cli.engine.image import image_stats
from klseg_cli.engine.local import evaluate
from klseg_cli.errors import InputError, LabelError, UsageError
from klseg_cli.io.readers import PredictionMap

from ..conftest import random_probs

needs_kernel = pytest.mark.skipif(not _fast.AVAILABLE, reason="numba is not installed")


def both_paths(pm, labels, settings, chunk=997):
    """Stats from the NumPy path and from the kernel (which must take every chunk)."""
    ref = image_stats(pm, labels, settings, chunk_pixels=chunk, accelerate=False)
    if not _fast.AVAILABLE:
        return [ref]
    taken = []
    add_chunk = _fast.add_chunk

    def counting(*args, **kwargs):
        taken.append(add_chunk(*args, **kwargs))
        return taken[-1]

    _fast.add_chunk = counting
    try:
        fast = image_stats(pm, labels, settings, chunk_pixels=chunk, accelerate=True)
    finally:
        _fast.add_chunk = add_chunk
    assert taken and all(taken), "the kernel did not take every chunk"
    return [ref, fast]


def slow_stats(p, labels, keep, C):
    """Reference over the pixels ``keep``: KL sum, confusion matrix (rows = target)."""
    p, y = p[keep], labels[keep].astype(int)
    kl = -np.log(np.maximum(p[np.arange(y.size), y], 1e-7))
    cm = np.zeros((C, C), dtype=np.int64)
    np.add.at(cm, (y, p.argmax(axis=1)), 1)
    return kl.sum(), cm


# --- 1. an ignore value inside 0..C-1 --------------------------------------------------------


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_ignore_value_inside_class_range_removes_pixels_on_both_paths(rng, layout):
    """Regression (#10): --ignore-index 0 was recorded but those pixels still counted."""
    h, w, C = 61, 67, 5
    p = random_probs(rng, h * w, C, saturate=0.1)
    labels = rng.integers(0, C, size=h * w).astype(np.uint8)
    labels[:50] = 255
    arr = p.reshape(h, w, C)
    if layout == "chw":
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
    s = MetricSettings(num_classes=C, ignore_index=(0, 255))
    keep = (labels != 0) & (labels != 255)
    kl_sum, cm = slow_stats(p.astype(np.float64), labels, keep, C)
    for stats in both_paths(PredictionMap("mem", arr, layout), labels.reshape(h, w), s):
        assert stats.n_valid == keep.sum()
        np.testing.assert_array_equal(stats.confusion, cm)
        assert stats.sums[0] == pytest.approx(kl_sum, rel=1e-6)
        # class 0 has no target pixels, but predictions of it on valid pixels still count
        assert stats.confusion[0].sum() == 0 and stats.confusion[:, 0].sum() > 0
        rows = class_metrics(stats, s)
        values = pixel_metrics(stats, s)
        ious = [rows[c]["iou"] for c in range(1, C)]
        assert values["miou"] == pytest.approx(np.mean(ious))  # class 0 left out of the mean
        assert rows[0]["iou"] == 0.0 and rows[0]["n_pred"] > 0  # its row keeps its counts


def test_ignore_value_inside_range_in_cli_summary_and_heatmap(tmp_path, rng):
    h, w, C = 20, 30, 4
    p = random_probs(rng, h * w, C).reshape(h, w, C)
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    np.save(tmp_path / "x.npy", p)
    Image.fromarray(labels).save(tmp_path / "x.png")
    run = CliRunner().invoke
    r = run(app, ["evaluate", str(tmp_path / "x.npy"), str(tmp_path / "x.png"),
                  "--ignore-index", "0", "--format", "json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["n_valid"] == int((labels != 0).sum())
    assert summary["settings"]["ignore_index"] == [0]  # replaces the default 255
    assert summary["class_means"]["left_out"] == {"0": "ignore value"}
    r = run(app, ["heatmap", str(tmp_path / "x.npy"), str(tmp_path / "x.png"), "-o",
                  str(tmp_path / "m.png"), "--ignore-index", "0", "--raw",
                  str(tmp_path / "m.tif")])  # fmt: skip
    assert r.exit_code == 0, r.output
    import tifffile

    raw = tifffile.imread(tmp_path / "m.tif")
    assert np.isnan(raw[labels == 0]).all() and np.isfinite(raw[labels != 0]).all()


# --- 5. Brier and JS of confident pixels ------------------------------------------------------


@pytest.mark.parametrize("d", [1e-2, 1e-4, 3e-5, 1e-6])
@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_brier_and_js_keep_relative_accuracy_on_confident_pixels(d, layout):
    """Regression (#10): Brier was exactly 0 for p_label ≥ 1 − 1e-4 (true 1.25e-8) and JS was
    1e-3 off at 3e-5, by cancellation. Both paths: relative error ≤ 1e-5."""
    C, n = 6, 4096
    p = np.zeros((n, C), dtype=np.float32)
    labels = (np.arange(n) % C).astype(np.uint8)
    p[np.arange(n), labels] = np.float32(1 - d)
    rest = (1.0 - p[np.arange(n), labels].astype(np.float64)) / (C - 1)
    for c in range(C):
        sel = labels != c
        p[sel, c] = rest[sel].astype(np.float32)
    p64 = p.astype(np.float64)
    q = np.zeros_like(p64)
    q[np.arange(n), labels] = 1.0
    brier = ((p64 - q) ** 2).sum(axis=1).sum()
    m = (p64 + q) / 2
    js = (0.5 * rel_entr(p64, m).sum(axis=1) + 0.5 * rel_entr(q, m).sum(axis=1)).sum()
    arr = p.reshape(64, 64, C)
    if layout == "chw":
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
    s = MetricSettings(num_classes=C)
    for stats in both_paths(PredictionMap("mem", arr, layout), labels.reshape(64, 64), s):
        assert stats.sums[5] == pytest.approx(brier, rel=1e-5)
        assert stats.sums[2] == pytest.approx(js, rel=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_brier_and_js_per_pixel_against_float64(rng, smoothing):
    """Random confident pixels, per pixel, NumPy path: Brier and JS within 1e-5 relative."""
    from klseg_cli.core.metrics import pixel_terms

    C, n = 5, 3000
    d = 10.0 ** rng.uniform(-6, -1, size=n)
    y = rng.integers(0, C, size=n)
    share = rng.dirichlet(np.ones(C - 1), size=n)
    p = np.zeros((n, C))
    for i in range(n):
        p[i, np.arange(C) != y[i]] = share[i] * d[i]
        p[i, y[i]] = 1 - d[i]
    P = np.ascontiguousarray(p.T.astype(np.float32))
    p64 = P.T.astype(np.float64)
    q = np.full((n, C), smoothing / C)
    q[np.arange(n), y] += 1 - smoothing
    brier = ((p64 - q) ** 2).sum(axis=1)
    m = (p64 + q) / 2
    js = 0.5 * rel_entr(p64, m).sum(axis=1) + 0.5 * rel_entr(q, m).sum(axis=1)
    t = pixel_terms(P, y, MetricSettings(num_classes=C, smoothing=smoothing), tolerance=1e-3)
    np.testing.assert_allclose(t.brier, brier, rtol=1e-5)
    # with smoothing, a pixel whose p is close to q has a small JS that float32 q_lo and
    # q_hi (rounded constants) limit to ~1e-3 relative; confident pixels are not that case
    np.testing.assert_allclose(t.js, js, rtol=1e-5 if not smoothing else 1e-3)


# --- label codes ----------------------------------------------------------------------------


def test_label_codes_for_each_convention():
    raw = np.array([0, 1, 4, 5, 200, 255], dtype=np.uint8)
    plain = LabelSpec(5, (255,))
    assert plain.codes(raw).tolist() == [0, 1, 4, BAD, BAD, IGNORED]
    void0 = LabelSpec(5, (0, 255))
    assert void0.codes(raw).tolist() == [IGNORED, 1, 4, BAD, BAD, IGNORED]
    assert void0.ignored_classes == (0,)
    reduced = LabelSpec(5, (255,), reduce_zero_label=True)  # ADE20K: 0 → ignore, k → k − 1
    assert reduced.codes(raw).tolist() == [IGNORED, 0, 3, 4, BAD, IGNORED]
    assert reduced.ignored_classes == ()
    wide = np.array([-1, 0, 70000, 3, -(2**40)], dtype=np.int64)
    assert LabelSpec(5, (-1,)).codes(wide).tolist() == [IGNORED, 0, BAD, 3, BAD]
    small = np.array([-128, -1, 0, 4, 127], dtype=np.int8)
    assert LabelSpec(5, (-1,)).codes(small).tolist() == [BAD, IGNORED, 0, 4, BAD]
    big_endian = np.array([3, 255, 7], dtype=">u2")
    assert plain.codes(big_endian).tolist() == [3, IGNORED, BAD]


def test_check_names_bad_raw_values_with_counts():
    labels = np.array([0, 9, 9, 200, 255], dtype=np.uint8)
    with pytest.raises(LabelError, match=r"9 \(2 px\), 200 \(1 px\)"):
        LabelSpec(5, (255,)).check(labels, "gt/x.png")
    with pytest.raises(LabelError, match=r"not 1\.\.5 \(--reduce-zero-label\)"):
        LabelSpec(5, (255,), reduce_zero_label=True).check(np.array([6], np.uint8), "x")


def test_cityscapes_label_map_matches_the_official_table():
    m = load_label_map("cityscapes")
    assert len(m.class_names) == 19
    spec = LabelSpec(19, (255,), label_map=m)
    raw = np.arange(-1, 40)
    codes = spec.codes(raw)
    for r, c in zip(raw.tolist(), codes.tolist()):
        train = CITYSCAPES_TRAIN_IDS.get(r, 255)
        assert c == (train if train != 255 else IGNORED), r
    # the 19 evaluated classes, each once, in trainId order
    assert sorted(c for c in CITYSCAPES_TRAIN_IDS.values() if c != 255) == list(range(19))


def test_label_map_files(tmp_path):
    (tmp_path / "m.json").write_text('{"10": 0, "20": 1, "30": null, "40": 255}')
    (tmp_path / "m.csv").write_text("raw,class\n10,0\n20,1\n30,\n40,255\n")
    raw = np.array([10, 20, 30, 40, 50, 255], dtype=np.uint8)
    for name in ("m.json", "m.csv"):
        spec = LabelSpec(2, (255,), label_map=load_label_map(tmp_path / name))
        assert spec.codes(raw).tolist() == [0, 1, IGNORED, IGNORED, IGNORED, IGNORED]
    (tmp_path / "bad.json").write_text('{"10": 7}')
    with pytest.raises(UsageError, match="10 → 7"):
        LabelSpec(2, (255,), label_map=load_label_map(tmp_path / "bad.json"))
    (tmp_path / "bad.csv").write_text("10,0,3\n")
    with pytest.raises(InputError, match=r"bad\.csv: line 1"):
        load_label_map(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="built-in maps: cityscapes"):
        load_label_map(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="do not go together"):
        LabelSpec(2, (255,), label_map=load_label_map("cityscapes"), reduce_zero_label=True)


def _pair(tmp_path, rng, raw_labels, C, name="x"):
    h, w = raw_labels.shape
    p = random_probs(rng, h * w, C).reshape(h, w, C)
    np.save(tmp_path / f"{name}.npy", p)
    Image.fromarray(raw_labels).save(tmp_path / f"{name}.png")
    return p.reshape(-1, C).astype(np.float64)


def test_label_map_and_reduce_zero_label_end_to_end(tmp_path, rng):
    h, w = 24, 32
    raw = rng.choice(np.array([0, 7, 8, 26, 33, 4]), size=(h, w)).astype(np.uint8)
    p = _pair(tmp_path, rng, raw, 19)
    result = evaluate(tmp_path / "x.npy", tmp_path / "x.png", label_map="cityscapes")
    summary = result.summary()
    to_train = np.vectorize(lambda r: CITYSCAPES_TRAIN_IDS.get(int(r), 255))(raw.reshape(-1))
    keep = to_train != 255
    kl_sum, cm = slow_stats(p, to_train, keep, 19)
    assert summary["n_valid"] == keep.sum()
    assert summary["dataset"]["kl_pooled"] == pytest.approx(kl_sum / keep.sum(), rel=1e-6)
    assert [c["n_target"] for c in summary["classes"]] == cm.sum(axis=1).tolist()
    assert summary["classes"][13]["class_name"] == "car"  # the built-in map's names
    assert summary["settings"]["label_map"]["name"] == "cityscapes"

    raw = rng.integers(0, 6, size=(h, w)).astype(np.uint8)
    raw[0] = 255
    p = _pair(tmp_path, rng, raw, 5, name="y")
    result = evaluate(tmp_path / "y.npy", tmp_path / "y.png", reduce_zero_label=True)
    flat = raw.reshape(-1).astype(int)
    keep = (flat != 0) & (flat != 255)
    kl_sum, cm = slow_stats(p, flat - 1, keep, 5)
    summary = result.summary()
    assert summary["n_valid"] == keep.sum()
    assert summary["dataset"]["kl_pooled"] == pytest.approx(kl_sum / keep.sum(), rel=1e-6)
    assert [c["n_target"] for c in summary["classes"]] == cm.sum(axis=1).tolist()


def test_log_base_below_or_at_one_or_infinite_is_refused():
    for base in (0.5, 1.0, math.inf, -2.0):
        with pytest.raises(UsageError, match="log-base"):
            MetricSettings(num_classes=3, log_base=base)


# --- soft targets, targets of other types, swapped arguments ---------------------------------


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("target_layout", ["hwc", "chw"])
@pytest.mark.parametrize("target_format", ["npy", "npz"])
def test_soft_target_class_axis_found_from_the_prediction(
    tmp_path, rng, target_layout, target_format
):
    """Regression (#10): a 10×12×19 soft target failed with advice to --renormalize."""
    h, w, C = 10, 12, 19
    p = random_probs(rng, h * w, C).reshape(h, w, C)
    q = random_probs(rng, h * w, C, dtype=np.float64).reshape(h, w, C)
    np.save(tmp_path / "x.npy", p)
    stored = q if target_layout == "hwc" else np.ascontiguousarray(q.transpose(2, 0, 1))
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    np.save(tmp_path / "pred" / "x.npy", p)
    if target_format == "npy":
        np.save(tmp_path / "gt" / "x.npy", stored)
    else:
        np.savez_compressed(tmp_path / "gt" / "x.npz", q=stored)
    r = _cli("evaluate", tmp_path / "pred", tmp_path / "gt", "--soft-gt", "--format", "json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    p64, q64 = p.reshape(-1, C).astype(np.float64), q.reshape(-1, C)
    ce = -(q64 * np.log(np.maximum(p64, 1e-7))).sum(axis=1).mean()
    assert summary["dataset"]["ce_pooled"] == pytest.approx(ce, rel=1e-5)


def test_target_of_unsupported_type_is_reported(tmp_path, rng):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    np.save(tmp_path / "pred" / "a.npy", random_probs(rng, 12, 3).reshape(3, 4, 3))
    np.save(tmp_path / "pred" / "b.npy", random_probs(rng, 12, 3).reshape(3, 4, 3))
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "gt" / "a.png")
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "gt" / "b.jpg")
    r = _cli("evaluate", tmp_path / "pred", tmp_path / "gt")
    assert r.exit_code == 2
    assert "b.jpg" in r.stderr and "unsupported file type '.jpg'" in r.stderr


def test_swapped_arguments_and_float_targets_are_explained(tmp_path, rng):
    p = random_probs(rng, 12, 3).reshape(3, 4, 3)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y.npy", np.zeros((3, 4), np.int32))
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "y.png")
    for labels in ("y.npy", "y.png"):
        r = _cli("evaluate", tmp_path / labels, tmp_path / "p.npy")
        assert r.exit_code == 2 and "swapped" in r.stderr, r.stderr
    np.save(tmp_path / "q.npy", p)  # a float (H, W, C) target without --soft-gt
    r = _cli("evaluate", tmp_path / "p.npy", tmp_path / "q.npy")
    assert r.exit_code == 2 and "--soft-gt" in r.stderr
    (tmp_path / "preds").mkdir()
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "preds" / "y.png")
    (tmp_path / "gts").mkdir()
    r = _cli("evaluate", tmp_path / "preds", tmp_path / "gts")
    assert r.exit_code == 2 and "swapped" in r.stderr


def test_logits_option_on_probabilities_warns(tmp_path, rng):
    np.save(tmp_path / "p.npy", random_probs(rng, 12, 3).reshape(3, 4, 3))
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "y.png")
    r = _cli("evaluate", tmp_path / "p.npy", tmp_path / "y.png", "--input", "logits")
    assert r.exit_code == 0
    assert r.stderr.startswith("warning: ") and "holds probabilities" in r.stderr


@pytest.mark.parametrize(
    "name,text",
    [
        ("c.txt", "bg\nroad\ncar\n"),
        ("c.txt", "0 bg\n1 road\n2 car\n"),
        ("c.txt", "2: car\n0: bg\n1: road\n"),
        ("c.json", '["bg", "road", "car"]'),
        ("c.json", '{"0": "bg", "2": "car", "1": "road"}'),
    ],
)
def test_class_name_files(tmp_path, name, text):
    from klseg_cli.engine.local import parse_classes

    (tmp_path / name).write_text(text)
    assert parse_classes(str(tmp_path / name)) == ("bg", "road", "car")


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("c.txt", "0 bg\n2 car\n", "ids must be 0..1"),
        ("c.json", '{"a": "bg"}', "map class ids to names"),
        ("c.json", "[1, 2", "not valid JSON"),
        ("c.json", '{"x": 1}', "map class ids"),
        ("c.txt", "bg\nbg\n", "twice: bg"),
    ],
)
def test_bad_class_name_files_name_the_file(tmp_path, name, text, needle):
    from klseg_cli.engine.local import parse_classes

    (tmp_path / name).write_text(text)
    with pytest.raises((InputError, UsageError), match=needle) as info:
        parse_classes(str(tmp_path / name))
    assert str(tmp_path / name) in str(info.value)
    with pytest.raises(InputError, match="no such class-names file"):
        parse_classes(str(tmp_path / "missing.json"))


# --- class subsets, macc, fwiou, confusion.csv, per_image_class.csv ---------------------------


def test_exclude_class_and_the_new_reports_against_a_slow_reference(tmp_path, rng):
    import csv

    C = 4
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    images = {}
    for stem, (h, w) in {"a": (9, 13), "b": (11, 7), "c": (6, 6)}.items():
        p = random_probs(rng, h * w, C)
        y = rng.integers(0, C, size=h * w).astype(np.uint8)
        y[:4] = 255
        np.save(tmp_path / "pred" / f"{stem}.npy", p.reshape(h, w, C))
        Image.fromarray(y.reshape(h, w)).save(tmp_path / "gt" / f"{stem}.png")
        images[stem] = (p.astype(np.float64), y)
    (tmp_path / "classes.txt").write_text("bg\nroad\ncar\nsky\n")
    out = tmp_path / "report"
    r = _cli("evaluate", tmp_path / "pred", tmp_path / "gt", "--classes", tmp_path / "classes.txt",
             "--exclude-class", "bg", "--exclude-class", "3", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())

    def cm_of(p, y):
        keep = y != 255
        cm = np.zeros((C, C), dtype=np.int64)
        for t, q in zip(y[keep], p[keep].argmax(axis=1)):
            cm[t, q] += 1
        return cm

    total = sum(cm_of(p, y) for p, y in images.values())
    tp, n_t, n_p = np.diag(total), total.sum(1), total.sum(0)
    iou = tp / (n_t + n_p - tp)
    kept = [1, 2]
    d = summary["dataset"]
    assert d["miou_pooled"] == pytest.approx(iou[kept].mean())
    assert d["macc_pooled"] == pytest.approx((tp / n_t)[kept].mean())
    assert d["fwiou_pooled"] == pytest.approx((n_t[kept] * iou[kept]).sum() / n_t[kept].sum())
    assert d["accuracy_pooled"] == pytest.approx(tp.sum() / total.sum())  # every pixel
    assert summary["class_means"]["classes"] == ["road", "car"]
    assert summary["class_means"]["left_out"] == {"bg": "--exclude-class", "sky": "--exclude-class"}
    assert summary["settings"]["exclude_classes"] == ["bg", "sky"]
    assert len(summary["classes"]) == C  # per-class rows stay
    per_image_miou = []
    for _stem, (p, y) in sorted(images.items()):
        cm = cm_of(p, y)
        t, nt, npred = np.diag(cm), cm.sum(1), cm.sum(0)
        den = nt + npred - t
        vals = [t[c] / den[c] for c in kept if den[c] > 0]
        per_image_miou.append(np.mean(vals))
    assert d["miou_image_mean"] == pytest.approx(np.mean(per_image_miou))

    with open(out / "confusion.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["target \\ predicted", "bg", "road", "car", "sky"]
    assert [r[0] for r in rows[1:]] == ["bg", "road", "car", "sky"]
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=int), total)

    with open(out / "per_image_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * C
    for row in rows:
        p, y = images[row["image"]]
        c = int(row["class_id"])
        cm = cm_of(p, y)
        assert int(row["tp"]) == cm[c, c]
        assert int(row["fp"]) == cm[:, c].sum() - cm[c, c]
        assert int(row["fn"]) == cm[c].sum() - cm[c, c]
        keep = y == c
        if keep.any():
            kl = -np.log(np.maximum(p[keep, c], 1e-7)).mean()
            assert float(row["kl"]) == pytest.approx(kl, rel=1e-5)
        else:
            assert row["kl"] == ""
        den = cm[:, c].sum() + cm[c].sum() - cm[c, c]
        assert (row["iou"] == "") == (den == 0)

    r = _cli("evaluate", tmp_path / "pred", tmp_path / "gt", "--exclude-class", "cat")
    assert r.exit_code == 2 and "--exclude-class 'cat' is not a class" in r.stderr


# --- gate and progress ------------------------------------------------------------------------


def _sample_summary(tmp_path, *extra):
    from .test_cli import SAMPLE

    out = tmp_path / "r"
    r = _cli("evaluate", SAMPLE / "predictions", SAMPLE / "ground_truth", "--out", out, *extra)
    assert r.exit_code in (0, 1), r.output
    return out / "summary.json"


def test_gate_suggests_names_and_rechecks_stored_requirements(tmp_path):
    summary = _sample_summary(tmp_path, "--require", "miou_pooled >= 0.5")
    r = _cli("gate", summary, "--require", "MIoU_pooled >= 0.5")
    assert r.exit_code == 2 and "did you mean 'miou_pooled'?" in r.stderr
    r = _cli("gate", summary, "--require", "kl_poold <= 1")
    assert r.exit_code == 2 and "did you mean 'kl_pooled'?" in r.stderr
    r = _cli("gate", summary, "--require", "iou[car] >= 0.5")  # evaluated without --classes
    assert r.exit_code == 2 and "pass --classes" in r.stderr
    r = _cli("gate", summary)  # no --require: the stored ones, again
    assert r.exit_code == 0 and "miou_pooled >= 0.5" in r.stdout
    r = _cli("gate", summary, "--require", "miou_pooled >= 0.99", "--format", "json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["passed"] is False and data["requirements"][0]["name"] == "miou_pooled"


def test_gate_without_stored_requirements_needs_one(tmp_path):
    summary = _sample_summary(tmp_path)
    r = _cli("gate", summary)
    assert r.exit_code == 2 and "stores no requirements" in r.stderr


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    from klseg_cli.cli import console

    monkeypatch.setattr(console._Ticker, "every", 0.0)
    summary = _sample_summary(tmp_path)
    assert summary.exists()
    from .test_cli import SAMPLE

    r = _cli("evaluate", SAMPLE / "predictions", SAMPLE / "ground_truth")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("evaluating: ")]
    assert lines and lines[-1].startswith("evaluating: 8/8 images")


def test_unit_labels_say_what_was_computed(tmp_path):
    """Regression (#10): --log-base 10 was labelled "nats" in the table."""
    from .test_cli import SAMPLE

    for base, unit in (("10", "log base 10"), ("2", "bits"), ("e", "nats")):
        r = _cli("evaluate", SAMPLE / "predictions", SAMPLE / "ground_truth", "--log-base", base)
        assert r.exit_code == 0
        assert f"kl, ce, js, entropy in {unit};" in " ".join(r.stdout.split())
        r = _cli("evaluate", SAMPLE / "predictions", SAMPLE / "ground_truth", "--log-base", base,
                 "--format", "json")  # fmt: skip
        assert json.loads(r.stdout)["unit"] == unit


def test_n_clipped_counts_every_clipped_value_that_enters_a_sum(rng):
    """Regression (#10): with smoothing or soft targets only the label's clipped value was
    counted, though every class's log p̃ enters CE and KL."""
    from klseg_cli.core.metrics import pixel_terms

    C, n = 4, 500
    p = random_probs(rng, n, C, saturate=0.5)  # exact zeros
    y = rng.integers(0, C, size=n)
    P = np.ascontiguousarray(p.T)
    hard = pixel_terms(P, y, MetricSettings(num_classes=C), tolerance=1e-3)
    assert hard.n_clipped == int((p[np.arange(n), y] < 1e-7).sum())
    smooth = pixel_terms(P, y, MetricSettings(num_classes=C, smoothing=0.1), tolerance=1e-3)
    assert smooth.n_clipped == int((p < 1e-7).sum()) > hard.n_clipped
    q = random_probs(rng, n, C, saturate=0.3, dtype=np.float64)
    soft = pixel_terms(P, np.ascontiguousarray(q.T).astype(np.float32),
                       MetricSettings(num_classes=C, soft_gt=True), tolerance=1e-3)  # fmt: skip
    assert soft.n_clipped == int(((p < 1e-7) & (q > 0)).sum())


@needs_kernel
def test_kernel_fallback_chunks_use_the_mapped_labels(rng):
    """A chunk the kernel hands back (a NaN under an ignored pixel) is computed by the NumPy
    path from the same mapped labels (here --reduce-zero-label: 0 ignored, k → k − 1)."""
    h, w, C = 32, 40, 4
    p = random_probs(rng, h * w, C)
    raw = rng.integers(1, C + 1, size=h * w).astype(np.uint8)
    raw[5] = 0  # ignored ...
    p[5] = np.nan  # ... so its NaN must not count
    s = MetricSettings(num_classes=C, reduce_zero_label=True)
    pm = PredictionMap("mem", p.reshape(h, w, C), "hwc")
    ref = image_stats(pm, raw.reshape(h, w), s, chunk_pixels=256, accelerate=False)
    fast = image_stats(pm, raw.reshape(h, w), s, chunk_pixels=256, accelerate=True)
    keep = raw != 0
    kl_sum, cm = slow_stats(p.astype(np.float64), raw.astype(int) - 1, keep, C)
    for stats in (ref, fast):
        np.testing.assert_array_equal(stats.confusion, cm)
        assert stats.sums[0] == pytest.approx(kl_sum, rel=1e-6)


def test_keep_going_with_every_pair_failing_writes_no_report(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for stem in ("a", "b"):
        np.save(tmp_path / "pred" / f"{stem}.npy", np.full((3, 4, 3), np.nan, np.float32))
        Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "gt" / f"{stem}.png")
    out = tmp_path / "report"
    r = _cli("evaluate", tmp_path / "pred", tmp_path / "gt", "--keep-going", "--out", out)
    assert r.exit_code == 2
    assert "no pair could be evaluated; no report was written" in r.stderr
    assert r.stderr.count("NaN") == 2  # each failure listed
    assert not out.exists() or not any(out.iterdir())


def test_settings_round_trip_through_summary_and_stats_npz(tmp_path, rng):
    """stats.npz rebuilds the same summary for label maps, ignore-in-range and exclusions."""
    from klseg_cli.io.statsfile import load_stats

    h, w = 12, 16
    raw = rng.choice(np.array([0, 7, 8, 26]), size=(h, w)).astype(np.uint8)
    _pair(tmp_path, rng, raw, 19)
    out = tmp_path / "r"
    r = _cli("evaluate", tmp_path / "x.npy", tmp_path / "x.png", "--label-map", "cityscapes",
             "--exclude-class", "road", "--ignore-index", "5", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    again = load_stats(out / "stats.npz").to_result().summary()
    assert MetricSettings.from_dict(summary["settings"]).as_dict() == summary["settings"]
    assert again["settings"] == summary["settings"]
    for key in ("miou_pooled", "macc_pooled", "fwiou_pooled", "kl_pooled"):
        assert again["dataset"][key] == pytest.approx(summary["dataset"][key], nan_ok=True)


def test_jobs_default_uses_the_cores_where_it_pays(tmp_path, rng, monkeypatch):
    """#14: --jobs defaults to the available cores (capped by the images): threads for
    kernel-sized maps, but no worker processes for small maps on the NumPy path."""
    from klseg_cli.engine import image
    from klseg_cli.engine import local as ev

    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for stem in "abc":
        np.save(tmp_path / "p" / f"{stem}.npy", random_probs(rng, 48, 3).reshape(6, 8, 3))
        Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "g" / f"{stem}.png")
    job = ev.plan(tmp_path / "p", tmp_path / "g")
    monkeypatch.setattr(ev, "available_cores", lambda: 16)
    assert ev.resolve_jobs(job, None) == (1, "serial")  # small maps: not worth a process
    assert ev.resolve_jobs(job, 2) == (2, "processes")
    assert ev.resolve_jobs(job, 1) == (1, "serial")
    if _fast.AVAILABLE:
        monkeypatch.setattr(ev, "FAST_MIN_VALUES", 1)  # the backend's choice
        monkeypatch.setattr(image, "FAST_MIN_VALUES", 1)  # and the kernel's
        assert ev.resolve_jobs(job, None) == (3, "threads")  # capped by the 3 images
        monkeypatch.setattr(ev, "available_cores", lambda: 2)
        assert ev.resolve_jobs(job, None) == (2, "threads")
    with pytest.raises(UsageError):
        ev.resolve_jobs(job, 0)


# --- more than 255 classes: label 255 is a class, not the default ignore value (P15 #2) ----


def _many_classes(tmp_path, rng, C):
    """A (20, 24, C) map whose argmax is the label, with the top rows labelled 255."""
    probs = random_probs(rng, 20 * 24, C).reshape(20, 24, C)
    labels = probs.argmax(axis=2).astype(np.uint16)
    labels[:5] = 255 if C > 255 else 0
    if C > 255:
        probs[:5] = 0.1 / (C - 1)
        probs[:5, :, 255] = 0.9  # predicted right: class 255 scores IoU 1
    np.save(tmp_path / "pred.npy", probs.astype(np.float32))
    np.save(tmp_path / "gt.npy", labels)
    return tmp_path / "pred.npy", tmp_path / "gt.npy", labels


def _summary(*args):
    res = CliRunner().invoke(app, ["evaluate", *map(str, args), "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_with_more_than_255_classes_label_255_is_class_255(tmp_path, rng):
    pred, gt, labels = _many_classes(tmp_path, rng, 300)
    s = _summary(pred, gt)
    assert s["settings"]["ignore_index"] == []
    assert s["n_valid"] == labels.size
    n255 = int((labels == 255).sum())
    assert n255 >= 120 and s["classes"][255]["n_target"] == n255
    assert s["classes"][255]["iou"] > 0.9
    ev = klseg_cli.Evaluator(300)  # the library follows the same rule
    ev.update(np.load(pred), labels)
    assert ev.settings.ignore_index == () and ev.compute()["n_valid"] == labels.size


def test_an_explicit_ignore_index_255_still_ignores_it_with_300_classes(tmp_path, rng):
    pred, gt, labels = _many_classes(tmp_path, rng, 300)
    n255 = int((labels == 255).sum())
    s = _summary(pred, gt, "--ignore-index", "255")
    assert s["n_valid"] == labels.size - n255 and s["classes"][255]["n_target"] == 0
    ev = klseg_cli.Evaluator(300, ignore_index=255)
    ev.update(np.load(pred), labels)
    assert ev.compute()["n_valid"] == labels.size - n255


@pytest.mark.parametrize("C", [19, 255])
def test_up_to_255_classes_255_is_still_ignored_by_default(tmp_path, rng, C):
    pred, gt, labels = _many_classes(tmp_path, rng, C)
    labels[-1] = 255
    np.save(gt, labels)
    s = _summary(pred, gt)
    assert s["settings"]["ignore_index"] == [255]
    assert s["n_valid"] == labels.size - 24
    assert klseg_cli.Evaluator(C).settings.ignore_index == (255,)


def test_default_ignore_index_follows_the_class_labels():
    from klseg_cli.core.labels import default_ignore_index

    assert default_ignore_index(255) == (255,)
    assert default_ignore_index(256) == ()
    assert default_ignore_index(254, reduce_zero_label=True) == (255,)
    assert default_ignore_index(255, reduce_zero_label=True) == ()  # raw 255 is class 254


def test_metric_settings_follow_the_same_default():
    assert MetricSettings(num_classes=19).ignore_index == (255,)
    assert MetricSettings(num_classes=300).ignore_index == ()
    assert MetricSettings(num_classes=300, ignore_index=(255,)).ignore_index == (255,)
