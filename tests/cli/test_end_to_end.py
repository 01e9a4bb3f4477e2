"""Whole runs on a mixed data set: every number in the three reports against the reference."""

import csv
import json
import math

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.core.stats import CLASS_COLUMNS, IMAGE_COLUMNS

from ..conftest import random_probs
from ..reference import evaluate_reference, to_pixels

C = 6
ABSENT = 3  # a class absent from both predictions and targets


def make_mixed(tmp_path, rng):
    """npy/tif, HWC/CHW, float16/32/64, palette/16-bit PNG, npy/tif masks, ignore regions."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    specs = [
        ("a", (40, 56), "npy", "hwc", np.float32, "png_p"),
        ("b", (33, 47), "tif", "chw", np.float16, "png_l"),
        ("c", (48, 30), "npy", "chw", np.float64, "npy"),
        ("d", (25, 64), "tifz", "hwc", np.float32, "png_16"),
        ("e", (31, 31), "npz", "hwc", np.float32, "tif"),
    ]
    truth = []
    for stem, (h, w), fmt, layout, dtype, mask_fmt in specs:
        p = random_probs(rng, h * w, C, saturate=0.3, dtype=np.float64)
        p[:, ABSENT] = 0.0
        p[p.sum(axis=1) == 0, 0] = 1.0  # a saturated row that was one-hot at ABSENT
        p /= p.sum(axis=1, keepdims=True)
        labels = rng.integers(0, C - 1, size=h * w)
        labels[labels >= ABSENT] += 1  # never ABSENT
        # agree with the argmax most of the time, as a model would
        agree = rng.random(h * w) < 0.7
        labels[agree] = p[agree].argmax(axis=1)
        labels[: w * 3] = 255  # an ignore region: the top three rows
        mask = labels.reshape(h, w).astype(np.uint8)
        if dtype == np.float16:
            # float16 rows must still sum to 1 within its tolerance; values as stored count
            p = p.astype(np.float16).astype(np.float64)
        stored = p.reshape(h, w, C).astype(dtype)
        if layout == "chw":
            stored = np.ascontiguousarray(stored.transpose(2, 0, 1))
        path = pred_dir / f"{stem}.{'tif' if fmt == 'tifz' else fmt}"
        if fmt == "npy":
            np.save(path, stored)
        elif fmt == "npz":
            np.savez_compressed(path, probs=stored)
        else:
            kw = {"compression": "zlib"} if fmt == "tifz" else {}
            tifffile.imwrite(
                path,
                stored,
                photometric="minisblack",
                planarconfig="contig" if layout == "hwc" else None,
                **kw,
            )
        if mask_fmt == "png_p":
            img = Image.fromarray(mask, mode="P")
            img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
            img.save(gt_dir / f"{stem}.png")
        elif mask_fmt == "png_l":
            Image.fromarray(mask, mode="L").save(gt_dir / f"{stem}.png")
        elif mask_fmt == "png_16":
            Image.fromarray(mask.astype(np.uint16)).save(gt_dir / f"{stem}.png")
        elif mask_fmt == "npy":
            np.save(gt_dir / f"{stem}.npy", mask.astype(np.int32))
        else:
            tifffile.imwrite(gt_dir / f"{stem}.tif", mask)
        truth.append((stem, to_pixels(stored, layout), labels))
    return pred_dir, gt_dir, truth


def read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def close(actual, expected):
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return actual in (None, "")
    actual = float(actual)
    return math.isclose(actual, float(expected), rel_tol=1e-5, abs_tol=1e-12)


@pytest.mark.parametrize("smoothing,log_base", [(0.0, "e"), (0.1, "2")])
def test_reports_match_independent_reference(tmp_path, rng, smoothing, log_base):
    pred_dir, gt_dir, truth = make_mixed(tmp_path, rng)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(pred_dir),
            str(gt_dir),
            "--out",
            str(out),
            "--smoothing",
            str(smoothing),
            "--log-base",
            log_base,
            "--chunk-pixels",
            "333",
        ],
    )
    assert result.exit_code == 0, result.output
    base = 2.0 if log_base == "2" else math.e
    rows, classes, dataset = evaluate_reference(truth, C, smoothing=smoothing, log_base=base)

    header, got_rows = read_csv(out / "per_image.csv")
    assert tuple(header) == IMAGE_COLUMNS
    assert [r["image"] for r in got_rows] == [r["image"] for r in rows]
    for got, ref in zip(got_rows, rows):
        for col in IMAGE_COLUMNS[3:]:
            assert close(got[col], ref[col]), (got["image"], col, got[col], ref[col])

    header, got_classes = read_csv(out / "per_class.csv")
    assert tuple(header) == CLASS_COLUMNS
    for got, ref in zip(got_classes, classes):
        for col in CLASS_COLUMNS:
            if col != "class_name":
                assert close(got[col], ref[col]), (got["class_id"], col, got[col], ref[col])
    absent = got_classes[ABSENT]
    assert absent["iou"] == "" and absent["dice"] == "" and absent["kl"] == ""

    summary = json.loads((out / "summary.json").read_text())
    for key, value in dataset.items():
        assert close(summary["dataset"][key], value), (key, summary["dataset"][key], value)
    assert summary["classes"][ABSENT]["iou"] is None  # null, not NaN, not 0
    assert summary["n_images"] == 5
    assert summary["n_valid"] == sum(int((t[2] != 255).sum()) for t in truth)
    if smoothing == 0.0:
        assert summary["dataset"]["kl_reverse_pooled"] is None
    assert summary["settings"]["smoothing"] == smoothing


def test_results_do_not_depend_on_chunk_size_or_file_order(tmp_path, rng):
    from klseg_cli import evaluate

    pred_dir, gt_dir, _ = make_mixed(tmp_path, rng)
    a = evaluate(pred_dir, gt_dir, chunk_pixels=97).summary()
    b = evaluate(pred_dir, gt_dir, chunk_pixels=1 << 20).summary()
    for key, value in a["dataset"].items():
        if value is None or math.isnan(value):
            assert math.isnan(b["dataset"][key])
        else:
            assert math.isclose(value, b["dataset"][key], rel_tol=1e-12), key
    # an absent class has NaN kl/ce/iou, and NaN != NaN: compare NaN-aware, every field
    assert len(a["classes"]) == len(b["classes"]) == C
    for x, y in zip(a["classes"], b["classes"]):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, float):
                assert math.isclose(value, y[key], rel_tol=1e-12) or (
                    math.isnan(value) and math.isnan(y[key])
                ), (x["class_id"], key, value, y[key])
            else:
                assert value == y[key], (x["class_id"], key)
    assert math.isnan(a["classes"][ABSENT]["kl"]) and a["classes"][0]["kl"] > 0
    for x, y in zip(a["images"], b["images"]):
        for key, value in x.items():
            assert (
                value == y[key]
                or math.isclose(value, y[key], rel_tol=1e-12)
                or (math.isnan(value) and math.isnan(y[key]))
            ), (x["image"], key)


def test_soft_targets_and_logits_end_to_end(tmp_path, rng):
    from klseg_cli import evaluate

    from ..reference import pixel_values

    h, w, C_ = 20, 30, 4
    z = rng.normal(0, 4, size=(h * w, C_))
    q = random_probs(rng, h * w, C_, saturate=0.0, dtype=np.float64)
    np.save(tmp_path / "p.npy", z.reshape(h, w, C_).astype(np.float32))
    np.save(tmp_path / "q.npy", np.ascontiguousarray(q.reshape(h, w, C_).transpose(2, 0, 1)))
    result = evaluate(
        tmp_path / "p.npy", tmp_path / "q.npy", soft_gt=True, input_kind="logits", chunk_pixels=77
    )
    ref = pixel_values(z.astype(np.float32), q, logits=True)
    dataset = result.summary()["dataset"]
    for name in ("kl", "kl_reverse", "js", "ce", "entropy", "brier"):
        assert math.isclose(dataset[f"{name}_pooled"], ref[name].mean(), rel_tol=1e-5), name
    labels = q.argmax(axis=1)
    assert math.isclose(dataset["accuracy_pooled"], (ref["pred"] == labels).mean())
