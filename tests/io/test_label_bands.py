"""Large label masks are read in row bands (``labelio.LabelBands``), never whole (P15 #1)."""

import os

import numpy as np
import pytest
import tifffile

from klseg_cli import evaluate
from klseg_cli.core import labels as labels_module
from klseg_cli.engine.image import image_stats
from klseg_cli.engine.local import plan
from klseg_cli.errors import ReadError
from klseg_cli.io import labelio
from klseg_cli.io.labelio import LabelBands
from klseg_cli.io.opening import open_pair
from klseg_cli.io.readers import read_target
from tests.conftest import random_probs

H, W, C = 96, 80, 5


def _pair(tmp_path, rng, fmt: str, dtype=np.uint8):
    """A (H, W, C) map and its labels (some 255: ignored) stored as ``fmt``."""
    probs = random_probs(rng, H * W, C).reshape(H, W, C)
    labels = rng.integers(0, C, size=(H, W)).astype(dtype)
    labels[::7, ::5] = 255
    np.save(tmp_path / "pred.npy", probs)
    if fmt == "npy":
        target = tmp_path / "gt.npy"
        np.save(target, labels)
    elif fmt == "tiff":
        target = tmp_path / "gt.tif"
        tifffile.imwrite(target, labels)
    elif fmt == "tiff-tiled":
        target = tmp_path / "gt.tif"
        tifffile.imwrite(target, labels, tile=(32, 32), compression="zlib")
    elif fmt == "tiff-strips":
        target = tmp_path / "gt.tif"
        tifffile.imwrite(target, labels, rowsperstrip=7, compression="zlib")
    else:
        zarr = pytest.importorskip("zarr")
        target = tmp_path / "gt.zarr"
        z = zarr.create_array(target, shape=labels.shape, chunks=(16, 32), dtype=labels.dtype)
        z[...] = labels
    return tmp_path / "pred.npy", target, labels


@pytest.fixture
def small_bands(monkeypatch):
    """Every mask over 256 bytes is banded, bands of 300 labels; reading one whole fails."""
    monkeypatch.setattr(labelio, "WHOLE_LABEL_BYTES", 256)
    monkeypatch.setattr(labelio, "BAND_ELEMENTS", 300)
    monkeypatch.setattr(labels_module, "LABEL_CHUNK", 400)  # the label check's pieces
    largest = []
    real = LabelBands.elements

    def elements(self, e0, e1):
        out = real(self, e0, e1)
        largest.append(e1 - e0)
        return out

    def whole(self, dtype=None, copy=None):
        raise AssertionError("a banded label mask was read whole")

    monkeypatch.setattr(LabelBands, "elements", elements)
    monkeypatch.setattr(LabelBands, "__array__", whole)
    return largest


@pytest.mark.parametrize("fmt", ["npy", "tiff", "tiff-tiled", "tiff-strips", "zarr"])
@pytest.mark.parametrize("accelerate", [False, True])
def test_large_targets_are_read_in_bands_with_the_same_numbers(
    tmp_path, rng, fmt, accelerate, small_bands
):
    pred, target, labels = _pair(tmp_path, rng, fmt)
    banded = read_target(target)
    assert isinstance(banded, LabelBands)
    assert banded.shape == (H, W) and banded.dtype == labels.dtype
    np.testing.assert_array_equal(banded[10:30], labels[10:30])
    job = plan(pred, target, chunk_pixels=512)
    opened = open_pair(job.pairing.pairs[0], soft_gt=False, num_classes=C, read=job.read)
    assert isinstance(opened.target, LabelBands)
    small_bands.clear()
    got = image_stats(opened.pred, opened.target, job.settings, chunk_pixels=512,
                      accelerate=accelerate)  # fmt: skip
    assert small_bands and max(small_bands) <= 512  # never more than a chunk at a time
    want = image_stats(opened.pred, labels, job.settings, chunk_pixels=512, accelerate=False)
    assert got.n_valid == want.n_valid == int((labels != 255).sum())
    np.testing.assert_array_equal(got.confusion, want.confusion)
    np.testing.assert_allclose(got.sums, want.sums, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got.class_kl, want.class_kl, rtol=1e-6, equal_nan=True)


def test_bool_masks_read_as_uint8_in_bands(tmp_path, rng, small_bands):
    labels = rng.random((H, W)) < 0.5
    np.save(tmp_path / "gt.npy", labels)
    banded = read_target(tmp_path / "gt.npy")
    assert banded.dtype == np.uint8
    np.testing.assert_array_equal(banded.reshape(-1)[100:900], labels.reshape(-1)[100:900])


def test_unknown_labels_in_a_banded_mask_fail_before_any_metric(tmp_path, rng, small_bands):
    pred, target, labels = _pair(tmp_path, rng, "npy")
    labels[-1, -1] = 9
    np.save(target, labels)
    with pytest.raises(Exception, match=r"9 \(1 px\)"):
        evaluate(pred, target)


def test_a_banded_mask_truncated_while_read_is_an_error_not_sigbus(tmp_path, rng, small_bands):
    _, target, _ = _pair(tmp_path, rng, "npy")
    banded = read_target(target)
    os.truncate(target, os.path.getsize(target) // 2)
    with pytest.raises(ReadError, match="file ended early"):
        banded.reshape(-1)[H * W - 10 : H * W]


def test_a_truncated_banded_mask_is_refused_from_its_header(tmp_path, rng, small_bands):
    _, target, _ = _pair(tmp_path, rng, "npy")
    os.truncate(target, os.path.getsize(target) - 100)
    with pytest.raises(ReadError, match="truncated"):
        read_target(target)


def _cli(*args):
    from typer.testing import CliRunner

    from klseg_cli.cli.root import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_heatmap_calibrate_compare_info_read_a_banded_mask_in_bands(tmp_path, rng, small_bands):
    pred, target, labels = _pair(tmp_path, rng, "npy")
    np.save(tmp_path / "whole.npy", labels)
    runs = {}
    for name, gt in (("banded", target), ("whole", tmp_path / "whole.npy")):
        if name == "whole":
            labelio.WHOLE_LABEL_BYTES = 1 << 30
        out = tmp_path / name
        out.mkdir()
        res = _cli("heatmap", pred, gt, "--panel", "-o", out / "h.png")
        assert res.exit_code == 0, res.output
        res = _cli("calibrate", pred, gt)
        assert res.exit_code == 0, res.output
        res2 = _cli("compare", pred, pred, gt, "--format", "json")
        assert res2.exit_code == 0, res2.output
        text = (res.stdout + res2.stdout).replace(str(gt), "GT")
        runs[name] = ((out / "h.png").read_bytes(), text)
    assert runs["banded"] == runs["whole"]


def test_info_says_how_a_target_is_read(tmp_path, rng, monkeypatch):
    from PIL import Image

    labels = rng.integers(0, C, size=(H, W)).astype(np.uint8)
    np.save(tmp_path / "gt.npy", labels)
    Image.fromarray(labels).save(tmp_path / "gt.png")
    res = _cli("info", tmp_path / "gt.npy")
    assert "whole, into memory" in res.stdout
    monkeypatch.setattr(labelio, "WHOLE_LABEL_BYTES", 256)
    res = _cli("info", tmp_path / "gt.npy")
    assert res.exit_code == 0 and "in row bands" in res.stdout, res.output
    assert f"0: {int((labels == 0).sum())}" in res.stdout
    res = _cli("info", tmp_path / "gt.png")
    assert "PNG label mask is always decoded whole" in res.stdout


# --- rater masks (evaluate --rater, heatmap --rater): the same bands --------------------------


def _write_mask(path_no_ext, labels, fmt: str):
    if fmt == "npy":
        path = path_no_ext.with_suffix(".npy")
        np.save(path, labels)
    elif fmt.startswith("tiff"):
        path = path_no_ext.with_suffix(".tif")
        kw = {"tiff": {}, "tiff-tiled": {"tile": (32, 32), "compression": "zlib"},
              "tiff-strips": {"rowsperstrip": 7, "compression": "zlib"}}[fmt]  # fmt: skip
        tifffile.imwrite(path, labels, **kw)
    else:
        zarr = pytest.importorskip("zarr")
        path = path_no_ext.with_suffix(".zarr")
        z = zarr.create_array(path, shape=labels.shape, chunks=(16, 32), dtype=labels.dtype)
        z[...] = labels
    return path


def _rater_set(tmp_path, rng, fmt: str, R: int = 3, n_images: int = 2):
    """pred/ and R rater folders of ``fmt`` masks (some pixels ignored by a rater)."""
    (tmp_path / "pred").mkdir()
    dirs = [tmp_path / f"r{r}" for r in range(R)]
    for d in dirs:
        d.mkdir()
    for i in range(n_images):
        np.save(tmp_path / "pred" / f"im{i}.npy", random_probs(rng, H * W, C).reshape(H, W, C))
        truth = rng.integers(0, C, size=(H, W))
        for r, d in enumerate(dirs):
            labels = np.where(rng.random((H, W)) < 0.3, rng.integers(0, C, (H, W)), truth)
            labels[rng.random((H, W)) < 0.05 * (r + 1)] = 255
            _write_mask(d / f"im{i}", labels.astype(np.uint8), fmt)
    return tmp_path / "pred", dirs


@pytest.mark.parametrize("fmt", ["npy", "tiff", "tiff-tiled", "tiff-strips", "zarr"])
def test_rater_masks_are_read_in_bands_with_the_same_numbers(tmp_path, rng, fmt, small_bands):
    """Each rater's mask is a LabelBands, read a chunk's rows at a time (never whole), and
    every number — the §2 sums against q and the multi-rater counts — equals a run that
    reads the masks whole."""
    from klseg_cli.core.labels import LabelSpec
    from klseg_cli.engine.raters import evaluate_raters
    from klseg_cli.io.raters import RaterMasks

    pred, dirs = _rater_set(tmp_path, rng, fmt)
    masks = RaterMasks([next(d.glob("im0.*")) for d in dirs], LabelSpec(C, (255,)))
    assert all(isinstance(m, LabelBands) for m in masks.masks)
    small_bands.clear()
    banded = evaluate_raters(pred, dirs, chunk_pixels=512).summary()
    assert small_bands and max(small_bands) <= 512  # never more than a chunk at a time
    labelio.WHOLE_LABEL_BYTES = 1 << 30  # the same files, read whole (monkeypatch restores)
    whole = evaluate_raters(pred, dirs, chunk_pixels=512)
    assert not any(isinstance(m, LabelBands) for m in RaterMasks(
        [next(d.glob("im0.*")) for d in dirs], LabelSpec(C, (255,))).masks)  # fmt: skip
    want = whole.summary()
    assert banded["n_valid"] == want["n_valid"]
    assert banded["dataset"] == pytest.approx(want["dataset"], rel=1e-12, nan_ok=True)
    assert banded["images"] == want["images"] and banded["classes"] == want["classes"]


def test_rater_heatmap_reads_banded_masks_in_bands(tmp_path, rng, small_bands):
    pred, dirs = _rater_set(tmp_path, rng, "npy", n_images=1)
    args = ["heatmap", pred / "im0.npy", *[a for d in dirs for a in ("--rater", d / "im0.npy")],
            "--metric", "rater-disagreement", "--panel"]  # fmt: skip
    res = _cli(*args, "-o", tmp_path / "banded.png")
    assert res.exit_code == 0, res.output
    labelio.WHOLE_LABEL_BYTES = 1 << 30
    res = _cli(*args, "-o", tmp_path / "whole.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "banded.png").read_bytes() == (tmp_path / "whole.png").read_bytes()


def test_a_rater_mask_truncated_is_one_clear_error(tmp_path, rng, small_bands):
    """Truncated before the run: refused from its header; truncated during it (between the
    label check and the chunks): "file ended early". One line naming the file, exit 2."""
    from klseg_cli.engine import raters as engine_raters

    pred, dirs = _rater_set(tmp_path, rng, "npy", n_images=1)
    bad = dirs[1] / "im0.npy"
    os.truncate(bad, os.path.getsize(bad) - 100)
    args = ["evaluate", pred, *[a for d in dirs for a in ("--rater", d)], "--out", tmp_path / "o"]
    res = _cli(*args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert str(bad) in res.output and "truncated" in res.output
    assert not (tmp_path / "o").exists()

    np.save(bad, rng.integers(0, C, size=(H, W)).astype(np.uint8))
    real = engine_raters.rater_image_stats

    def truncating(pred_map, masks, settings, **kw):  # the file shrinks after the check
        os.truncate(bad, os.path.getsize(bad) // 2)
        return real(pred_map, masks, settings, **kw)

    engine_raters.rater_image_stats = truncating
    try:
        res = _cli(*args)
    finally:
        engine_raters.rater_image_stats = real
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert str(bad) in res.output and "file ended early" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "o").exists()
