"""``klseg evaluate PRED --rater ...`` and ``klseg heatmap --rater ... --metric
rater-disagreement`` from the command line: exit codes, one-line errors, outputs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from klseg_cli.cli.root import app

from ..conftest import random_probs

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_data"
RATERS = [SAMPLE / "raters" / n for n in ("rater_a", "rater_b", "rater_c")]
H, W, C = 9, 11, 3


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(7)
    pred = tmp_path / "pred"
    pred.mkdir()
    dirs = []
    for r in range(3):
        (tmp_path / f"r{r}").mkdir()
        dirs.append(tmp_path / f"r{r}")
    for stem in ("a", "b"):
        np.save(pred / f"{stem}.npy", random_probs(rng, H * W, C).reshape(H, W, C))
        for d in dirs:
            m = rng.integers(0, C, (H, W)).astype(np.uint8)
            m[0, :3] = 255
            Image.fromarray(m, mode="L").save(d / f"{stem}.png")
    return pred, dirs, tmp_path / "out"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def raters_args(dirs):
    return [x for d in dirs for x in ("--rater", d)]


def assert_refused(result, out, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert not out.exists()


def test_evaluate_with_raters_writes_the_scores(data):
    pred, dirs, out = data
    gates = ["--require", "ged_image_mean <= 2", "--require", "soft_dice_pooled >= 0"]
    result = run("evaluate", pred, *raters_args(dirs), "--out", out, *gates)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for name in ("soft_dice", "ged", "miou_vs_raters", "rater_pairwise_miou"):
        assert isinstance(summary["dataset"][f"{name}_pooled"], float)
        assert isinstance(summary["dataset"][f"{name}_image_mean"], float)
    assert summary["settings"]["raters"]["count"] == 3
    assert summary["settings"]["soft_gt"] is True
    assert summary["n_valid"] == 2 * (H * W - 3)
    assert [r["passed"] for r in summary["requirements"]] == [True, True]
    with open(out / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"soft_dice", "ged", "miou_vs_raters", "rater_pairwise_miou"} <= set(rows[0])
    assert float(rows[0]["ged"]) == pytest.approx(summary["images"][0]["ged"])
    with open(out / "per_class.csv") as fh:
        assert "soft_dice" in next(csv.DictReader(fh))
    assert "rater_pairwise_miou" in result.stdout


def test_a_baseline_gates_the_rater_scores(data, tmp_path):
    pred, dirs, out = data
    assert run("evaluate", pred, *raters_args(dirs), "--out", out).exit_code == 0
    again = run("evaluate", pred, *raters_args(dirs), "--baseline", out / "summary.json",
                "--require", "ged_pooled <= baseline + 0", "--format", "json")  # fmt: skip
    assert again.exit_code == 0, again.output
    # two raters instead of three: other numbers, and the baseline says so
    other = run("evaluate", pred, *raters_args(dirs[:2]), "--baseline", out / "summary.json",
                "--require", "ged_pooled <= baseline")  # fmt: skip
    assert other.exit_code == 2 and "raters" in other.stderr


def test_rater_folders_with_different_stems(data):
    pred, dirs, out = data
    (dirs[2] / "b.png").rename(dirs[2] / "c.png")
    result = run("evaluate", pred, *raters_args(dirs), "--out", out)
    # r2/c.png is a stem r0 (and r1) lack
    assert_refused(result, out, f"{dirs[2] / 'c.png'}: rater folder {dirs[0]} has no mask",
                   "every --rater folder must hold the same stems")  # fmt: skip


def test_rater_masks_of_different_shapes(data):
    pred, dirs, out = data
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(dirs[1] / "a.png")
    result = run("evaluate", pred, *raters_args(dirs), "--out", out)
    assert_refused(result, out, dirs[1] / "a.png", f"({H}, {W + 1})", f"({H}, {W})")


def test_rater_labels_outside_the_class_range(data):
    pred, dirs, out = data
    m = np.zeros((H, W), np.uint8)
    m[2, 2] = 7
    Image.fromarray(m).save(dirs[2] / "b.png")
    result = run("evaluate", pred, *raters_args(dirs), "--out", out)
    assert_refused(result, out, dirs[2] / "b.png", "7 (1 px)")


def test_a_samples_folder_without_a_map(data):
    pred, dirs, out = data
    samples = out.parent / "samples"
    samples.mkdir()
    np.save(samples / "a.npy", np.load(pred / "a.npy"))
    result = run("evaluate", pred, *raters_args(dirs), "--samples", samples, "--out", out)
    assert_refused(result, out, samples, "no sample map for 'b'")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["GT", "--rater", "R0", "--rater", "R1"], "pass GT or --rater folders, not both"),
        (["--rater", "R0"], "--rater needs at least two rater folders (got 1)"),
        ([], "missing argument GT"),
        (["GT", "--samples", "R0"], "--samples needs --rater"),
        (["GT", "--require", "ged_pooled <= 1"], "ged_pooled is computed against raters"),
        (["--rater", "R0", "--rater", "R1", "--soft-gt"], "leave out --soft-gt"),
        (["--rater", "R0", "--rater", "R1", "--heatmaps", "2"], "rater-disagreement"),
    ],
)
def test_command_lines_that_do_not_fit(data, args, needle):
    pred, dirs, out = data
    names = {"GT": dirs[0], "R0": dirs[0], "R1": dirs[1]}
    result = run("evaluate", pred, *[names.get(a, a) for a in args], "--out", out)
    assert_refused(result, out, needle)


def test_rater_disagreement_heatmap(data, tmp_path):
    pred, dirs, _ = data
    out = tmp_path / "maps"
    result = run("heatmap", pred, *raters_args(dirs), "--metric", "rater-disagreement",
                 "-o", out, "--colorbar", "--raw", tmp_path / "raw")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "a_rater-disagreement.png",
        "b_rater-disagreement.png",
    ]
    import tifffile

    values = tifffile.imread(tmp_path / "raw" / "a_rater-disagreement.tif")
    stack = np.stack([np.asarray(Image.open(d / "a.png")) for d in dirs]).astype(np.int64)
    freq = np.stack([(stack == c).sum(0) for c in range(C)]) / 3.0
    expected = 1.0 - freq.max(axis=0)
    expected[0, :3] = np.nan  # no rater labels these
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert Image.open(out / "a_rater-disagreement.png").size[0] >= W


def test_heatmap_rater_disagreement_needs_raters(data, tmp_path):
    pred, dirs, _ = data
    out = tmp_path / "x.png"
    result = run("heatmap", pred / "a.npy", dirs[0] / "a.png", "--metric", "rater-disagreement",
                 "-o", out)  # fmt: skip
    assert_refused(result, out, "--metric rater-disagreement needs --rater")
    result = run("heatmap", pred, *raters_args(dirs), "--metric", "kl", "-o", tmp_path / "m")
    assert_refused(result, tmp_path / "m", "--rater draws --metric rater-disagreement")


def test_sample_data_raters_worked_example():
    """The worked example of docs/design/multi-rater.md: the model is less alike the raters
    than they are alike each other, and its KL against their map is finite."""
    result = run("evaluate", SAMPLE / "predictions", *raters_args(RATERS), "--classes",
                 SAMPLE / "classes.txt", "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["dataset"]
    assert d["rater_pairwise_miou_pooled"] > d["miou_vs_raters_pooled"] > 0.8
    assert 0 < d["ged_image_mean"] < 0.5 and 0.9 < d["soft_dice_pooled"] < 1
    assert 0 < d["kl_pooled"] < 1


def test_sample_data_raters_are_what_the_script_makes(tmp_path):
    """make_sample_data.py with its fixed seed remakes the rater masks byte for byte (and
    the files that were there before them)."""
    subprocess.run([sys.executable, ROOT / "scripts" / "make_sample_data.py", tmp_path],
                   check=True)  # fmt: skip
    for folder in ("raters/rater_a", "raters/rater_b", "raters/rater_c", "ground_truth"):
        for path in sorted((SAMPLE / folder).iterdir()):
            assert (tmp_path / folder / path.name).read_bytes() == path.read_bytes(), path


def test_panel_target_is_the_raters_majority(data):
    """--panel: the target panel is the most frequent label (ties to the lowest class),
    unlabelled pixels -1; the predicted panel is the argmax of PRED."""
    from klseg_cli.commands.raters import rater_map
    from klseg_cli.core.labels import LabelSpec
    from klseg_cli.core.metrics import MetricSettings
    from klseg_cli.io.raters import RaterMasks
    from klseg_cli.io.readers import open_prediction

    pred, dirs, _ = data
    masks = RaterMasks([d / "a.png" for d in dirs], LabelSpec(C, (255,)))
    pm = open_prediction(pred / "a.npy", hw=(H, W))
    mm = rater_map(pm, masks, MetricSettings(C), with_pred=True, chunk_pixels=7)
    stack = np.stack(masks.masks).astype(np.int64)
    counts = np.stack([(stack == c).sum(0) for c in range(C)])
    expected = np.where((stack != 255).any(0), counts.argmax(0), -1)
    np.testing.assert_array_equal(mm.labels, expected)
    np.testing.assert_array_equal(mm.pred, np.load(pred / "a.npy").argmax(-1))
