"""Defects found by a new user's trial of the release: each is one clear line, exit 2, and
nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app

from ..commands.test_api import SAMPLE

PRED = str(SAMPLE / "predictions" / "scene_04.npy")
GT = str(SAMPLE / "ground_truth" / "scene_04.png")
RATERS = [str(SAMPLE / "raters" / f"rater_{r}") for r in "abc"]
CLASSES = str(SAMPLE / "classes.txt")


def one_line_exit_2(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for needle in needles:
        assert needle in line, line
    return line


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "extra",
    [("--uncertainty", "entropy"), ("--require", "auroc_entropy_pooled >= 0.5")],
    ids=["flag", "require"],
)
def test_failure_detection_with_raters_is_a_usage_error(extra, tmp_path):
    """--rater with --uncertainty (or a --require on its metrics) crashed with exit 3."""
    rater_args = [a for r in RATERS for a in ("--rater", r)]
    result = run("evaluate", str(SAMPLE / "predictions"), *rater_args, "--classes", CLASSES,
                 *extra, "--out", str(tmp_path / "out"))  # fmt: skip
    one_line_exit_2(result, "--rater", "one label target")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_risk_coverage_path_fails_before_any_work(tmp_path):
    """/proc/rc.png passed os.access as root; the report was written, then the plot failed."""
    result = run("evaluate", str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"),
                 "--classes", CLASSES, "--uncertainty", "entropy", "--risk-coverage",
                 "/proc/rc.png", "--out", str(tmp_path / "out"))  # fmt: skip
    one_line_exit_2(result, "/proc/rc.png", "cannot write")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_heatmap_threshold_must_be_a_score(value, tmp_path):
    out = tmp_path / "t.png"
    result = run("heatmap", PRED, GT, "--metric", "uncertainty-error", "--threshold", value,
                 "-o", str(out))  # fmt: skip
    one_line_exit_2(result, "--threshold")
    assert not out.exists()


def test_an_empty_uncertainty_list_is_refused():
    one_line_exit_2(run("evaluate", PRED, GT, "--uncertainty", ""), "--uncertainty")


def test_the_same_rater_folder_twice_is_refused():
    result = run("evaluate", str(SAMPLE / "predictions"), "--rater", RATERS[0], "--rater",
                 RATERS[0] + "/", "--classes", CLASSES)  # fmt: skip
    one_line_exit_2(result, "given twice")


def test_a_url_for_classes_is_named_as_such():
    result = run("evaluate", PRED, GT, "--classes", "https://127.0.0.1:9/classes.txt")
    one_line_exit_2(result, "https://127.0.0.1:9/classes.txt", "URLs are not read")
