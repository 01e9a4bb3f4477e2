"""Heatmaps: size and mode, colour order, ignore colour, overlay, colorbar, downsampling,
chunked == one-shot, and the CLI around them."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from klseg_cli import heatmap as hm
from klseg_cli.cli import app
from klseg_cli.evaluation import open_pair, plan
from klseg_cli.heatmap import (
    HeatmapOptions,
    MetricMap,
    block_reduce,
    colormap_lut,
    compute_map,
    percentile,
    render,
)

from .conftest import random_probs
from .test_cli import SAMPLE, sample_args

runner = CliRunner()


def luminance(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]


def vmap(values, metric="kl"):
    values = np.asarray(values, dtype=np.float32)
    return MetricMap(metric, values, None, None, "nats")


def png_array(path):
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def test_png_is_the_input_size_and_rgb(tmp_path):
    values = np.random.default_rng(0).random((37, 53))
    render(vmap(values), tmp_path / "a.png", HeatmapOptions(vmin=0, vmax=1))
    assert png_array(tmp_path / "a.png").shape == (37, 53, 3)


def test_luminance_rises_with_the_value_for_the_default_map(tmp_path):
    values = np.tile(np.linspace(0, 1, 256), (4, 1))
    render(vmap(values), tmp_path / "g.png", HeatmapOptions(vmin=0, vmax=1))
    lum = luminance(png_array(tmp_path / "g.png")[0])
    assert (np.diff(lum) >= -0.5).all()  # non-decreasing up to rounding
    assert lum[-1] - lum[0] > 200
    np.testing.assert_array_equal(png_array(tmp_path / "g.png")[0, 0], colormap_lut("magma")[0])


def test_values_outside_the_range_are_clipped(tmp_path):
    render(vmap([[-5.0, 0.0, 1.0, 50.0]]), tmp_path / "c.png", HeatmapOptions(vmin=0, vmax=1))
    row = png_array(tmp_path / "c.png")[0]
    lut = colormap_lut("magma")
    np.testing.assert_array_equal(row, [lut[0], lut[0], lut[-1], lut[-1]])


def test_ignored_pixels_get_the_ignore_colour(tmp_path):
    values = np.full((4, 5), 0.5)
    values[1, 2] = np.nan
    render(vmap(values), tmp_path / "i.png", HeatmapOptions(ignore_color="#00ff00", vmax=1))
    img = png_array(tmp_path / "i.png")
    assert tuple(img[1, 2]) == (0, 255, 0)
    assert tuple(img[0, 0]) != (0, 255, 0)


def test_overlay_blends_with_alpha(tmp_path):
    values = np.linspace(0, 1, 20).reshape(4, 5)
    photo = np.random.default_rng(1).integers(0, 256, size=(4, 5, 3)).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    render(vmap(values), tmp_path / "plain.png", HeatmapOptions(vmin=0, vmax=1))
    render(
        vmap(values),
        tmp_path / "over.png",
        HeatmapOptions(vmin=0, vmax=1, overlay=tmp_path / "photo.png", alpha=0.25),
    )
    heat = png_array(tmp_path / "plain.png").astype(np.float64)
    expected = np.rint(0.75 * photo + 0.25 * heat)
    np.testing.assert_allclose(png_array(tmp_path / "over.png"), expected, atol=1)


def test_colorbar_adds_a_legend_strip(tmp_path):
    values = np.random.default_rng(2).random((30, 300))
    info = render(vmap(values), tmp_path / "cb.png", HeatmapOptions(colorbar=True, vmax=1))
    img = png_array(tmp_path / "cb.png")
    assert img.shape[1] == 300 and img.shape[0] > 30
    assert info["height"] == img.shape[0]
    strip = img[30:]
    lut = colormap_lut("magma")
    bar = strip[10]  # a row through the gradient
    assert (bar[10] == lut[0]).all() and (bar[300 - 11] == lut[-1]).all()
    assert (strip == 20).all(axis=2).any()  # dark text was drawn


def test_max_side_keeps_a_single_hot_pixel(tmp_path):
    values = np.zeros((100, 80))
    values[37, 51] = 1.0
    info = render(vmap(values), tmp_path / "m.png", HeatmapOptions(vmax=1, max_side=10))
    img = png_array(tmp_path / "m.png")
    assert img.shape[:2] == (10, 8) and info["factor"] == 10
    lut = colormap_lut("magma")
    assert tuple(img[3, 5]) == tuple(lut[-1])
    assert (img.reshape(-1, 3) == lut[-1]).all(axis=1).sum() == 1
    render(vmap(values), tmp_path / "mean.png", HeatmapOptions(vmax=1, max_side=10, reduce="mean"))
    assert tuple(png_array(tmp_path / "mean.png")[3, 5]) != tuple(lut[-1])


def test_block_reduce_ignores_nan():
    band = np.array([[np.nan, np.nan, 1.0], [np.nan, np.nan, 3.0]], dtype=np.float32)
    out = block_reduce(band, 2, "max")
    assert np.isnan(out[0, 0]) and out[0, 1] == 3.0
    assert block_reduce(band, 2, "mean")[0, 1] == 2.0


def test_percentile_matches_numpy():
    rng = np.random.default_rng(3)
    values = rng.gamma(0.5, 2.0, size=(300, 200)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = np.nan
    for q in (50, 99, 100):
        exact = np.nanpercentile(values, q, method="lower")  # an actual value, no interpolation
        span = np.nanmax(values) - np.nanmin(values)
        assert exact - span / 4096**2 <= percentile(values, q) <= exact, q
    assert np.isnan(percentile(np.full((3, 3), np.nan, np.float32), 99))


def make_pair(tmp_path, rng, h=40, w=30, C=4):
    p = random_probs(rng, h * w, C, saturate=0.3).reshape(h, w, C)
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    labels[:3] = 255
    np.save(tmp_path / "x.npy", p)
    Image.fromarray(labels, mode="L").save(tmp_path / "x.png")
    return tmp_path / "x.npy", tmp_path / "x.png"


def test_chunked_rendering_equals_one_shot(tmp_path, rng, monkeypatch):
    pred, gt = make_pair(tmp_path, rng)
    job = plan(pred, gt)
    opened = open_pair(job.pairing.pairs[0], soft_gt=False, num_classes=4, read=job.read)
    big = compute_map(opened, job.settings, "kl", with_pred=True, chunk_pixels=1 << 20)
    render(big, tmp_path / "one.png", HeatmapOptions(panel=True, colorbar=True))
    monkeypatch.setattr(hm, "BAND_PIXELS", 61)  # bands of two rows
    monkeypatch.setattr(hm, "IN_MEMORY_PIXELS", 100)  # the map goes to a temporary file
    small = compute_map(opened, job.settings, "kl", with_pred=True, chunk_pixels=37)
    assert isinstance(small.values, hm.DiskMap) and isinstance(small.pred, hm.DiskMap)
    np.testing.assert_array_equal(np.asarray(small.values), big.values)
    np.testing.assert_array_equal(np.asarray(small.pred), big.pred)
    render(small, tmp_path / "chunked.png", HeatmapOptions(panel=True, colorbar=True))
    np.testing.assert_array_equal(
        png_array(tmp_path / "one.png"), png_array(tmp_path / "chunked.png")
    )
    hm.write_raw(small, tmp_path / "small.tif")
    hm.write_raw(big, tmp_path / "big.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "small.tif"), big.values)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "big.tif"), big.values)


def test_map_values_are_the_core_per_pixel_values(tmp_path, rng):
    from .reference import hard_targets, pixel_values

    pred, gt = make_pair(tmp_path, rng)
    job = plan(pred, gt)
    opened = open_pair(job.pairing.pairs[0], soft_gt=False, num_classes=4, read=job.read)
    labels = opened.target.reshape(-1)
    valid = labels != 255
    ref = pixel_values(np.load(pred).reshape(-1, 4)[valid], hard_targets(labels[valid], 4, 0))
    for metric in ("kl", "js", "entropy", "confidence"):
        mm = compute_map(opened, job.settings, metric)
        v = mm.values.reshape(-1)
        assert np.isnan(v[~valid]).all()
        np.testing.assert_allclose(v[valid], ref[metric], rtol=2e-5, atol=2e-6)
    err = compute_map(opened, job.settings, "error").values.reshape(-1)[valid]
    np.testing.assert_array_equal(err, (ref["pred"] != labels[valid]).astype(np.float32))


def test_cli_single_pair_and_raw(tmp_path, rng):
    pred, gt = make_pair(tmp_path, rng)
    result = runner.invoke(
        app,
        [
            "heatmap",
            str(pred),
            str(gt),
            "-o",
            str(tmp_path / "o.png"),
            "--raw",
            str(tmp_path / "o.tif"),
            "--metric",
            "js",
        ],
    )
    assert result.exit_code == 0, result.output
    assert png_array(tmp_path / "o.png").shape == (40, 30, 3)
    raw = tifffile.imread(tmp_path / "o.tif")
    assert raw.dtype == np.float32 and raw.shape == (40, 30)
    assert np.isnan(raw[:3]).all() and np.nanmax(raw) <= np.log(2) + 1e-6


def test_cli_entropy_needs_no_target(tmp_path, rng):
    pred, _ = make_pair(tmp_path, rng)
    result = runner.invoke(
        app, ["heatmap", str(pred), "--metric", "entropy", "-o", str(tmp_path / "e.png")]
    )
    assert result.exit_code == 0, result.output
    assert png_array(tmp_path / "e.png").shape == (40, 30, 3)
    result = runner.invoke(app, ["heatmap", str(pred), "-o", str(tmp_path / "k.png")])
    assert result.exit_code == 2 and "needs a target" in result.stderr


def test_cli_folders_write_one_png_per_pair(tmp_path):
    out = tmp_path / "maps"
    result = runner.invoke(
        app,
        [
            "heatmap",
            str(SAMPLE / "predictions"),
            str(SAMPLE / "ground_truth"),
            "-o",
            str(out),
            "--panel",
            "--classes",
            str(SAMPLE / "classes.txt"),
        ],
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"scene_{i:02d}_kl.png" for i in range(8)]


def test_unknown_colormap_is_a_usage_error(tmp_path, rng):
    pred, gt = make_pair(tmp_path, rng)
    result = runner.invoke(
        app,
        ["heatmap", str(pred), str(gt), "-o", str(tmp_path / "out.png"), "--cmap", "no_such_map"],
    )
    assert result.exit_code == 2 and "no_such_map" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_evaluate_writes_heatmaps_of_the_worst_images(tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, [str(a) for a in sample_args("--out", out, "--heatmaps", "3")])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    worst = sorted(summary["images"], key=lambda r: r["kl"], reverse=True)[:3]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == sorted(
        f"{r['image']}_kl.png" for r in worst
    )


@pytest.mark.parametrize(
    "bad", [["--alpha", "2"], ["--max-side", "0"], ["--vmin", "2", "--vmax", "1"]]
)
def test_bad_options_exit_2(tmp_path, rng, bad):
    pred, gt = make_pair(tmp_path, rng)
    result = runner.invoke(
        app, ["heatmap", str(pred), str(gt), "-o", str(tmp_path / "o.png"), *bad]
    )
    assert result.exit_code == 2
