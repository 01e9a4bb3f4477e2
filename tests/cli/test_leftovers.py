"""P15 #5: compare --require names, panel titles in narrow panels, Click choice errors, and
one output rule (missing parent folders are made) for every command."""

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.render.heatmap import BACKGROUND, title_strip

from ..conftest import random_probs

runner = CliRunner()


def _pair(tmp_path, rng, h=20, w=24, C=4):
    probs = random_probs(rng, h * w, C).reshape(h, w, C)
    np.save(tmp_path / "a.npy", probs)
    np.save(tmp_path / "b.npy", np.ascontiguousarray(probs[:, :, ::-1]))
    np.save(tmp_path / "y.npy", probs.argmax(axis=2).astype(np.uint8))
    return tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "y.npy"


def _klseg(*args):
    """The installed command in a child process: its exact stderr."""
    return subprocess.run([sys.executable, "-m", "klseg_cli", *map(str, args)],
                          capture_output=True, text=True)  # fmt: skip


@pytest.mark.parametrize("expr", ["bogus <= 1", "iou <= 1"])
def test_compare_require_lists_only_names_it_takes(tmp_path, rng, expr):
    a, b, _ = _pair(tmp_path, rng)
    res = runner.invoke(app, ["compare", str(a), str(b), "--require", expr])
    assert res.exit_code == 2
    assert "Valid names: agreement_image_mean" in res.output
    assert "[CLASS]" not in res.output and "[NAME]" not in res.output
    res = runner.invoke(app, ["evaluate", str(a), str(tmp_path / "y.npy"), "--require", expr])
    assert res.exit_code == 2 and "iou[CLASS]" in res.output  # evaluate takes them


@pytest.mark.parametrize("panel_w", [20, 24, 40, 59])
def test_panel_titles_stay_inside_their_panels(panel_w):
    titles = ["target", "predicted", "kl_reverse (nats)"]
    width = max(300, 3 * panel_w)
    for i, title in enumerate(titles):
        strip = title_strip(width, panel_w, [""] * i + [title])
        ink = np.flatnonzero((strip != np.array(BACKGROUND, np.uint8)).any(axis=(0, 2)))
        assert ink.size, f"{title!r} drew nothing at {panel_w} px"
        assert i * panel_w <= ink.min() and ink.max() < (i + 1) * panel_w, (title, ink)


def test_a_choice_error_is_one_clean_usage_line(tmp_path, rng):
    a, b, _ = _pair(tmp_path, rng)
    res = _klseg("compare", a, b, "--format", "csv")
    assert res.returncode == 2
    want = "Error: Invalid value for '--format': 'csv' is not one of 'table', 'json'.\n"
    assert res.stderr == want


def test_every_output_path_gets_its_missing_parent_folders(tmp_path, rng):
    a, _, y = _pair(tmp_path, rng)
    res = runner.invoke(app, ["heatmap", str(a), str(y), "-o", str(tmp_path / "new" / "x.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "new" / "x.png").stat().st_size > 0
    res = runner.invoke(app, ["evaluate", str(a), str(y), "--require", "miou_pooled >= 0",
                              "--junit", str(tmp_path / "ci" / "deep" / "gate.xml")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ci" / "deep" / "gate.xml").exists()
    res = runner.invoke(app, ["heatmap", str(a), str(y), "-o", str(a / "x.png")])
    assert res.exit_code == 2
    assert res.output == f"Error: {a / 'x.png'}: cannot write: {a} is a file, not a folder\n"
