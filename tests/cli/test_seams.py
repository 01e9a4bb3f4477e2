"""Where features merged separately meet: each test is a bug an independent review found."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.errors import UsageError

from .test_cli import SAMPLE

CLASSES = str(SAMPLE / "classes.txt")
PRED, PRED_B, GT = (str(SAMPLE / d) for d in ("predictions", "predictions_b", "ground_truth"))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_compare_agreement_miou_covers_the_mean_classes():
    """agreement_miou averaged over every class, ignoring --exclude-class and ignore values
    inside 0..C-1 that every other class mean honours."""
    all_ = json.loads(run("compare", PRED, PRED_B, GT, "--classes", CLASSES,
                          "--format", "json").stdout)  # fmt: skip
    excl = json.loads(run("compare", PRED, PRED_B, GT, "--classes", CLASSES, "--exclude-class",
                          "road", "--format", "json").stdout)  # fmt: skip
    key = "agreement_miou_pooled"
    find = lambda s: next(v for k, v in _walk(s) if k == key)  # noqa: E731
    assert find(all_) != pytest.approx(find(excl))


def _walk(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def test_calibration_views_are_refused_on_volumes(tmp_path, rng):
    p = rng.dirichlet(np.ones(3), size=(6, 7, 5)).astype(np.float32)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y.npy", rng.integers(0, 3, size=(6, 7, 5)).astype(np.uint8))
    r = run("evaluate", tmp_path / "p.npy", tmp_path / "y.npy", "--spatial-dims", "3",
            "--calibration-views")  # fmt: skip
    assert r.exit_code == 2 and "2-D images only" in r.stderr


def test_a_baseline_with_the_same_label_map_read_from_another_path(tmp_path, monkeypatch):
    import shutil

    table = {str(i): i for i in range(5)}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "lm.json").write_text(json.dumps(table))
    shutil.copy(tmp_path / "a" / "lm.json", tmp_path / "lm.json")
    base = tmp_path / "base"
    r = run("evaluate", PRED, GT, "--classes", CLASSES, "--label-map", tmp_path / "a" / "lm.json",
            "--out", base)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run(
        "evaluate",
        PRED,
        GT,
        "--classes",
        CLASSES,
        "--label-map",
        tmp_path / "lm.json",
        "--baseline",
        base / "summary.json",
        "--require",
        "miou_pooled >= baseline - 0.01",
    )
    assert r.exit_code == 0, r.output


def test_builtin_label_map_settings_round_trip_and_evaluators_merge():
    from klseg_cli.commands.evaluator import Evaluator
    from klseg_cli.core.metrics import MetricSettings

    a = Evaluator(label_map="cityscapes")
    again = MetricSettings.from_dict(a.settings.as_dict())
    assert again == a.settings and again.label_map.class_names == a.settings.label_map.class_names
    a.merge(Evaluator(settings=again))


def test_reliability_inside_a_new_report_folder(tmp_path):
    out = tmp_path / "r"
    r = run("evaluate", PRED, GT, "--classes", CLASSES, "--out", out, "--reliability",
            out / "rel.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (out / "rel.png").stat().st_size > 0 and (out / "summary.json").exists()


def test_heatmap_against_follows_the_output_rules(tmp_path):
    r = run("heatmap", PRED, "--against", PRED_B, "-o", tmp_path / "one.png")
    assert r.exit_code == 2 and "need a folder" in r.stderr
    assert not (tmp_path / "one.png").exists()
    one = str(SAMPLE / "predictions" / "scene_04.npy")
    r = run("heatmap", one, "--against", str(SAMPLE / "predictions_b" / "scene_04.npz"),
            "-o", tmp_path / "x.jpg")  # fmt: skip
    assert r.exit_code == 2 and ".png" in r.stderr and not (tmp_path / "x.jpg").exists()


def test_unsupported_url_scheme_is_one_line():
    r = run("evaluate", "ftp://x/y.npy", GT)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "ftp://" in r.stderr


def test_evaluator_from_result_refuses_boundary_settings():
    from klseg_cli import evaluate
    from klseg_cli.commands.evaluator import Evaluator
    from klseg_cli.core.boundary import BoundaryOptions

    result = evaluate(PRED, GT, boundary=BoundaryOptions())
    with pytest.raises(UsageError, match="boundary"):
        Evaluator.from_result(result)


# --- from a new user's trial of the README ---------------------------------------------------


def test_new_user_mistakes_get_helpful_errors(tmp_path, rng):
    r = run("evaluate", PRED, GT, "--reliability", tmp_path / "rel.jpg")
    assert r.exit_code == 2 and "name it .png" in r.stderr
    r = run("evaluate", PRED, GT, "--out", PRED)
    assert r.exit_code == 2 and "is an input folder" in r.stderr
    r = run("evaluate", PRED, GT, "--require", "miou >= 0.8")
    assert r.exit_code == 2 and "did you mean 'miou_pooled' or 'miou_image_mean'? Valid" in r.stderr
    np.save(tmp_path / "p.npy", rng.dirichlet(np.ones(3), size=(6, 7)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.zeros((6, 7, 5), np.uint8))
    r = run("evaluate", tmp_path / "p.npy", tmp_path / "y.npy")
    assert r.exit_code == 2 and "--spatial-dims 3" in r.stderr
    r = run("gate", tmp_path)
    assert r.exit_code == 2 and "summary.json" in r.stderr


def test_tables_are_not_wrapped_in_ci_logs(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    r = run("evaluate", PRED, GT, "--require", "kl_pooled <= 0.5")
    assert "brier: multi-class sum (0..2)" in r.stdout  # one line, not "brier:" / "multi-..."


def test_calibrate_write_folder_is_checked_before_the_fit(tmp_path):
    import shutil

    shutil.copy(SAMPLE / "predictions" / "scene_00.npy", tmp_path / "scene_00.npy")
    r = run("calibrate", PRED, GT, "--write", tmp_path)
    assert r.exit_code == 2 and "exists already" in r.stderr
    assert "pass 1" not in r.stderr  # refused before any pass over the data
