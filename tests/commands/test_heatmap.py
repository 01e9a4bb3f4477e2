"""Heatmaps: size and mode, colour order, ignore colour, overlay, colorbar, downsampling,
chunked == one-shot, and the CLI around them."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.engine import maps
from klseg_cli.engine.local import plan
from klseg_cli.engine.maps import MetricMap, compute_map
from klseg_cli.io.opening import open_pair
from klseg_cli.render import heatmap as hm
from klseg_cli.render.heatmap import (
    HeatmapOptions,
    block_reduce,
    colormap_lut,
    percentile,
    render,
)

from ..cli.test_cli import SAMPLE, sample_args
from ..conftest import random_probs

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
    monkeypatch.setattr(maps, "BAND_PIXELS", 61)  # the temporary file's too
    monkeypatch.setattr(maps, "IN_MEMORY_PIXELS", 100)  # the map goes to a temporary file
    small = compute_map(opened, job.settings, "kl", with_pred=True, chunk_pixels=37)
    assert isinstance(small.values, maps.DiskMap) and isinstance(small.pred, maps.DiskMap)
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
    from ..reference import hard_targets, pixel_values

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


# --- #10: outputs, colours, ranges -------------------------------------------------------------


def test_output_names_are_png_files_or_folders(tmp_path):
    one = [
        str(SAMPLE / "predictions" / "scene_04.npy"),
        str(SAMPLE / "ground_truth" / "scene_04.png"),
    ]
    r = runner.invoke(app, ["heatmap", *one, "-o", str(tmp_path / "x.jpg")])
    assert r.exit_code == 2 and "give a name ending in .png" in r.stderr
    assert not (tmp_path / "x.jpg").exists()  # no folder called x.jpg
    folders = [str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth")]
    r = runner.invoke(app, ["heatmap", *folders, "-o", str(tmp_path / "one.png")])
    assert r.exit_code == 2 and "8 pairs need a folder" in r.stderr
    assert not (tmp_path / "one.png").exists()
    r = runner.invoke(app, ["heatmap", *one, "-o", str(tmp_path / "ok.png")])
    assert r.exit_code == 0 and (tmp_path / "ok.png").is_file()


def test_class_colours_never_equal_the_ignore_colour():
    grey = np.array(hm.parse_color(hm.DEFAULT_IGNORE_COLOR))
    for n in (8, 10, 15, 20, 40):
        palette = hm.class_palette(n, grey)
        assert len(palette) == n
        assert min(np.linalg.norm(palette.astype(float) - grey, axis=1)) >= 48


def test_palette_targets_use_their_own_palette(tmp_path):
    colours = [(128, 64, 128), (70, 70, 70), (0, 0, 142)]
    mm = MetricMap("kl", np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint16), None, "")
    mm.palette = np.zeros((256, 3), np.uint8)
    mm.palette[:3] = colours
    mm.palette[255] = (0, 0, 0)
    grey = np.array(hm.parse_color(hm.DEFAULT_IGNORE_COLOR), np.uint8)
    got, ignore = hm.panel_colours(mm, 3, grey, False, (255,))
    assert got.tolist() == [list(c) for c in colours]
    assert ignore.tolist() == [0, 0, 0]  # the palette's own colour of the ignore value
    mm.palette[:3] = [(0, 0, 0), (1, 1, 1), (2, 2, 2)]  # a ramp, not a palette: generated
    got, _ = hm.panel_colours(mm, 3, grey, False, (255,))
    assert got.tolist() != mm.palette[:3].tolist()


def test_folder_heatmaps_share_one_scale(tmp_path):
    out = tmp_path / "maps"
    args = [str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"), "-o", str(out)]
    r = runner.invoke(app, ["heatmap", *args, "--classes", str(SAMPLE / "classes.txt")])
    assert r.exit_code == 0, r.output
    settings_job = plan(SAMPLE / "predictions", SAMPLE / "ground_truth")
    values, maps = [], []
    for pair in settings_job.pairing.pairs:
        opened = open_pair(pair, soft_gt=False, num_classes=5, read=settings_job.read)
        mm = compute_map(opened, settings_job.settings, "kl", target_path=pair.target)
        values.append(mm.values[np.isfinite(mm.values)])
        maps.append(mm.values)
    shared = np.percentile(np.concatenate(values), 99, method="lower")
    hist = hm.LogHistogram()
    for v in values:
        hist.add(v[None, :])
    assert hist.percentile(99) == pytest.approx(shared, rel=3e-3)
    # the same colour means the same value in every image: pixels at the shared vmax or above
    # are the brightest colour in each PNG
    lut = colormap_lut("magma")
    vmax = hist.percentile(99)
    for pair, m in zip(settings_job.pairing.pairs, maps):
        png = png_array(out / f"{pair.stem}_kl.png")
        hot = m >= vmax
        assert (png[hot] == lut[-1]).all()
        assert not (png[np.isfinite(m) & (m < vmax * 0.9)] == lut[-1]).all(axis=-1).any()
    info = render(vmap([[0.0, 1.0], [2.0, 5.0]]), tmp_path / "s.png", HeatmapOptions(colorbar=True),
                  shared_vmax=2.0)  # fmt: skip
    assert info["vmax"] == 2.0 and info["clipped"] and "all images" in info["source"]
    assert (png_array(tmp_path / "s.png")[1, 1] == lut[-1]).all()


def test_uniformly_good_map_states_its_range(tmp_path):
    info = render(vmap(np.full((10, 10), 1e-3)), tmp_path / "u.png", HeatmapOptions(colorbar=True))
    assert info["source"] == "99th pct" and info["vmax"] == pytest.approx(1e-3)
    info = render(vmap([[0.0, 1.0]], metric="error"), tmp_path / "e.png",
                  HeatmapOptions(colorbar=True))  # fmt: skip
    assert info["source"] == "fixed"
    strip = png_array(tmp_path / "e.png")[1:]
    # a two-colour legend: no continuous gradient row in the strip
    assert max(len(np.unique(row.reshape(-1, 3), axis=0)) for row in strip) < 120
