"""The CLI in-process: exact exit codes, one-line errors, CSV headers, null for undefined."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.core.stats import CLASS_COLUMNS, IMAGE_COLUMNS

from ..conftest import random_probs

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_data"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def sample_args(*extra):
    return [
        "evaluate",
        SAMPLE / "predictions",
        SAMPLE / "ground_truth",
        "--classes",
        SAMPLE / "classes.txt",
        *extra,
    ]


def test_every_command_has_help():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("evaluate", "info"):
        sub = run(command, "--help")
        assert sub.exit_code == 0, command
        assert "Example" in sub.stdout


def test_eps_default_is_the_library_default():
    """Every command's --eps default is metrics.DEFAULT_EPS (one place): a change of the
    library default reaches the CLI, its help and the recorded settings."""
    import inspect

    from klseg_cli.core.metrics import DEFAULT_EPS

    with_eps = []
    for command in app.registered_commands:
        params = inspect.signature(command.callback).parameters
        if "eps" not in params:
            continue
        name = command.name or command.callback.__name__
        with_eps.append(name)
        assert params["eps"].default == DEFAULT_EPS, name
        assert f"[default: {DEFAULT_EPS}]" in " ".join(run(name, "--help").stdout.split())
    assert {"evaluate", "heatmap", "compare", "calibrate"} <= set(with_eps)
    result = run(*sample_args("--format", "json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["eps"] == DEFAULT_EPS


def test_evaluate_sample_data_tables():
    result = run(*sample_args())
    assert result.exit_code == 0, result.output
    assert "8 images" in result.stdout
    assert "vegetation" in result.stdout and "miou" in result.stdout
    assert "—" in result.stdout  # kl_reverse is undefined against hard labels


def test_evaluate_writes_reports(tmp_path):
    out = tmp_path / "report"
    result = run(*sample_args("--out", out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "calibration.csv",
        "confusion.csv",
        "per_class.csv",
        "per_image.csv",
        "per_image_class.csv",
        "reliability.png",
        "stats.npz",
        "summary.json",
    ]
    image_lines = (out / "per_image.csv").read_text().splitlines()
    assert image_lines[0] == ",".join(IMAGE_COLUMNS)
    assert len(image_lines) == 9
    assert image_lines[1].startswith("scene_00,120,160,")
    assert ",," in image_lines[1]  # kl_reverse: empty, not nan
    class_lines = (out / "per_class.csv").read_text().splitlines()
    assert class_lines[0] == ",".join(CLASS_COLUMNS)
    assert [line.split(",")[1] for line in class_lines[1:]] == [
        "road",
        "building",
        "vegetation",
        "sky",
        "car",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["kl_reverse_pooled"] is None
    assert summary["n_images"] == 8
    assert summary["settings"]["classes"][0] == "road"
    assert "NaN" not in (out / "summary.json").read_text()


def test_format_json_is_pure_json_on_stdout():
    result = run(*sample_args("--format", "json"))
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert 0 < summary["dataset"]["miou_pooled"] <= 1
    assert summary["dataset"]["kl_pooled"] == pytest.approx(summary["dataset"]["ce_pooled"])


def test_log_base_2_gives_bits():
    nats = json.loads(run(*sample_args("--format", "json")).stdout)["dataset"]
    bits = json.loads(run(*sample_args("--format", "json", "--log-base", "2")).stdout)["dataset"]
    assert bits["kl_pooled"] == pytest.approx(nats["kl_pooled"] / np.log(2))
    assert bits["brier_pooled"] == pytest.approx(nats["brier_pooled"])


def two_files(tmp_path, rng, labels=None, probs=None, shape=(6, 8), C=3):
    h, w = shape
    p = random_probs(rng, h * w, C).reshape(h, w, C) if probs is None else probs
    np.save(tmp_path / "x.npy", p)
    lab = rng.integers(0, C, size=shape).astype(np.uint8) if labels is None else labels
    Image.fromarray(lab, mode="L").save(tmp_path / "x.png")
    return tmp_path / "x.npy", tmp_path / "x.png"


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_unknown_label_exits_2_naming_the_file(tmp_path, rng):
    labels = np.zeros((6, 8), np.uint8)
    labels[0, 0] = 7
    pred, gt = two_files(tmp_path, rng, labels=labels)
    out = tmp_path / "out"
    result = run("evaluate", pred, gt, "--out", out)
    assert_one_line_error(result, str(gt), "7 (1 px)")
    assert not out.exists()  # nothing written, not even the folder


def test_logits_given_as_probabilities_suggest_input_logits(tmp_path, rng):
    logits = rng.normal(0, 3, size=(6, 8, 3)).astype(np.float32)
    pred, gt = two_files(tmp_path, rng, probs=logits)
    result = run("evaluate", pred, gt)
    assert_one_line_error(result, str(pred), "--input logits")
    assert run("evaluate", pred, gt, "--input", "logits").exit_code == 0


def test_shape_mismatch(tmp_path, rng):
    pred, _ = two_files(tmp_path, rng)
    Image.fromarray(np.zeros((5, 8), np.uint8), mode="L").save(tmp_path / "x.png")
    result = run("evaluate", pred, tmp_path / "x.png")
    assert_one_line_error(result, str(pred), "(6, 8, 3)", "(5, 8)")


def test_class_count_mismatch(tmp_path, rng):
    pred, gt = two_files(tmp_path, rng)
    result = run("evaluate", pred, gt, "--classes", "a,b")
    assert_one_line_error(result, str(pred), "3 classes", "expected 2")


def test_ambiguous_layout_asks_for_layout(tmp_path, rng):
    probs = random_probs(rng, 9, 3).reshape(3, 3, 3)
    pred, gt = two_files(tmp_path, rng, probs=probs, shape=(3, 3))
    assert_one_line_error(run("evaluate", pred, gt), "--layout")
    assert run("evaluate", pred, gt, "--layout", "hwc").exit_code == 0


def test_missing_prediction_needs_allow_missing(tmp_path, rng):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    two_files(tmp_path / "p", rng)
    (tmp_path / "p" / "x.png").rename(tmp_path / "g" / "x.png")
    Image.fromarray(np.zeros((6, 8), np.uint8), mode="L").save(tmp_path / "g" / "y.png")
    assert_one_line_error(run("evaluate", tmp_path / "p", tmp_path / "g"), "--allow-missing")
    result = run("evaluate", tmp_path / "p", tmp_path / "g", "--allow-missing", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["missing_predictions"] == [str(tmp_path / "g" / "y.png")]
    assert "y.png" in result.stderr


def test_out_must_not_be_a_file(tmp_path, rng):
    pred, gt = two_files(tmp_path, rng)
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("evaluate", pred, gt, "--out", tmp_path / "file"), "--out")


def test_debug_shows_the_traceback(tmp_path, rng):
    labels = np.full((6, 8), 9, np.uint8)
    pred, gt = two_files(tmp_path, rng, labels=labels)
    result = run("evaluate", pred, gt, "--debug")
    assert result.exit_code != 0
    assert result.exception is not None and "9 (48 px)" in str(result.exception)


def test_info_describes_a_map_and_a_mask():
    result = run("info", SAMPLE / "predictions" / "scene_00.npy")
    assert result.exit_code == 0, result.output
    assert "HWC" in result.stdout and "(120, 160, 5)" in result.stdout
    assert "sums to 1" in result.stdout
    result = run("info", SAMPLE / "predictions" / "scene_01.tif")
    assert "CHW" in result.stdout
    result = run("info", SAMPLE / "ground_truth" / "scene_00.png")
    assert result.exit_code == 0 and "255:" in result.stdout


def test_info_flags_logits(tmp_path, rng):
    np.save(tmp_path / "z.npy", rng.normal(0, 3, size=(6, 8, 3)).astype(np.float32))
    result = run("info", tmp_path / "z.npy", "--classes", "a,b,c")
    assert result.exit_code == 0
    assert "logits" in result.stdout


def test_real_process_exit_codes(tmp_path, rng):
    ok = subprocess.run(
        [sys.executable, "-m", "klseg_cli", *map(str, sample_args())],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    labels = np.full((6, 8), 9, np.uint8)
    pred, gt = two_files(tmp_path, rng, labels=labels)
    bad = subprocess.run(
        [sys.executable, "-m", "klseg_cli", "evaluate", str(pred), str(gt)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_every_eps_default_follows_the_library_default():
    """A changed library default reaches every command: the CLI, imported afresh (in a
    process of its own) with another DEFAULT_EPS, has it in every signature (a literal 1e-7
    left anywhere fails)."""
    import subprocess
    import sys

    code = """
import inspect
from klseg_cli import defaults
defaults.DEFAULT_EPS = 3e-7
from klseg_cli.cli.root import app
for command in app.registered_commands:
    params = inspect.signature(command.callback).parameters
    print(command.callback.__name__, params["eps"].default if "eps" in params else "-")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    defaults = dict(line.split() for line in out.stdout.splitlines())
    assert set(defaults) == {"evaluate", "gate", "compare", "calibrate", "heatmap", "info"}
    assert {name: value for name, value in defaults.items() if value != "-"} == {
        name: "3e-07" for name in ("evaluate", "compare", "calibrate", "heatmap")
    }
