"""klseg heatmap --metric uncertainty-error: four colours by (uncertain, wrong)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.core import uncertainty as unc
from klseg_cli.render import uncertainty_map


@pytest.fixture
def pair(tmp_path):
    """A 6×8 two-class map: columns 0-3 confident (p = 0.99), 4-7 unsure (p = 0.6);
    rows 0-2 labelled as predicted, rows 3-5 the other class; one ignored pixel."""
    p1 = np.where(np.arange(8) < 4, 0.99, 0.6).astype(np.float32)
    P = np.zeros((6, 8, 2), np.float32)
    P[..., 1] = p1
    P[..., 0] = 1 - p1
    y = np.ones((6, 8), np.uint8)
    y[3:] = 0
    y[0, 0] = 255
    np.save(tmp_path / "a.npy", P)
    Image.fromarray(y).save(tmp_path / "a.png")
    return tmp_path / "a.npy", tmp_path / "a.png", P, y


def expected(P, y, threshold, ignore_rgb=(128, 128, 128)):
    ent = -(P * np.log(P)).sum(-1)
    cat = 2 * (ent >= threshold) + (P.argmax(-1) != y)
    rgb = np.array([c for _, c in uncertainty_map.COLOURS], np.uint8)[cat]
    rgb[y == 255] = ignore_rgb
    return rgb


def test_four_colours_at_a_given_threshold(pair, tmp_path):
    pred, gt, P, y = pair
    out = tmp_path / "ue.png"
    args = ["--metric", "uncertainty-error", "--threshold", "0.3", "-o", str(out)]
    res = CliRunner().invoke(app, ["heatmap", str(pred), str(gt), *args])
    assert res.exit_code == 0, res.output
    img = np.asarray(Image.open(out).convert("RGB"))
    assert (img[:6, :8] == expected(P, y, 0.3)).all()
    assert len({tuple(c) for c in img[:6, :8].reshape(-1, 3)}) == 5  # 4 colours + ignored
    assert img.shape[0] > 6  # the legend below the map


def test_default_threshold_is_the_images_ueo_threshold(pair, tmp_path):
    pred, gt, P, y = pair
    out = tmp_path / "ue.png"
    res = CliRunner().invoke(
        app, ["heatmap", str(pred), str(gt), "--metric", "uncertainty-error", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    keep = y != 255
    ent = -(P * np.log(P)).sum(-1)[keep].astype(np.float32)
    hist, _ = unc.chunk_histograms(ent[None], (P.argmax(-1) != y)[keep])
    t = unc.failure_detection(hist[0])["ueo_threshold"]
    img = np.asarray(Image.open(out).convert("RGB"))
    assert (img[:6, :8] == expected(P, y, t)).all()


def test_threshold_without_the_metric_is_a_usage_error(pair, tmp_path):
    pred, gt, _, _ = pair
    res = CliRunner().invoke(app, ["heatmap", str(pred), str(gt), "--threshold", "0.3",
                                   "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert res.exit_code == 2
    assert "--metric uncertainty-error" in res.output
