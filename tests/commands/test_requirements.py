"""CI gates: the --require grammar, NaN, baselines, settings mismatch, exit codes, JUnit."""

import copy
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.commands.requirements import check_names, check_requirements, parse_requirement
from klseg_cli.errors import UsageError

from ..cli.test_cli import sample_args

runner = CliRunner()


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = runner.invoke(app, [str(a) for a in sample_args("--out", out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text()), out / "summary.json"


# --- grammar ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["<", "<=", ">", ">="])
def test_every_operator(op):
    req = parse_requirement(f"miou_pooled {op} 0.7")
    assert (req.metric, req.op, req.number, req.baseline) == ("miou_pooled", op, 0.7, False)


@pytest.mark.parametrize(
    "text,number",
    [
        ("miou_pooled >= baseline", 0.0),
        ("miou_pooled >= baseline - 0.01", -0.01),
        ("miou_pooled>=baseline+0.5", 0.5),
        ("kl_pooled <= baseline -0.25", -0.25),
        ("kl_pooled<=baseline-1e-3", -1e-3),
    ],
)
def test_baseline_arithmetic(text, number):
    req = parse_requirement(text)
    assert req.baseline and math.isclose(req.number, number)


@pytest.mark.parametrize(
    "text,metric,klass",
    [
        ("iou[road] >= 0.9", "iou", "road"),
        ("dice[3]>0.5", "dice", "3"),
        ("  kl[ traffic light ]   <  2 ", "kl", "traffic light"),
        ("ce[car]<=1e1", "ce", "car"),
    ],
)
def test_classes_by_name_or_id_and_whitespace(text, metric, klass):
    req = parse_requirement(text)
    assert (req.metric, req.klass) == (metric, klass)


@pytest.mark.parametrize(
    "text,why",
    [
        ("", "needs an expression"),
        ("miou_pooled", "comparison"),
        ("miou_pooled >=", "must follow"),
        (">= 0.7", "start with a metric"),
        ("miou_pooled == 0.7", "comparison"),
        ("miou_pooled >= 0.7 0.8", "unexpected"),
        ("miou_pooled >= best", "neither a number"),
        ("miou_pooled >= baseline * 2", "cannot read"),
        ("iou[] > 1", "empty class"),
        ("miou_pooled >= baseline + -1", "one sign"),
        ("__import__('os') > 1", "cannot read"),
        ("miou_pooled >= inf", "neither a number"),
    ],
)
def test_malformed_expressions(text, why):
    with pytest.raises(UsageError, match=why):
        parse_requirement(text)


def test_unknown_names_list_the_valid_ones(summary):
    s, _ = summary
    with pytest.raises(UsageError, match=r"Valid names: .*miou_pooled.*iou\[CLASS\]"):
        check_requirements(s, ["miou >= 0.5"])
    with pytest.raises(UsageError, match=r"road \(0\)"):
        check_requirements(s, ["iou[bus] >= 0.5"])
    with pytest.raises(UsageError, match="per-class values need a class"):
        check_names(["iou >= 0.5"])
    with pytest.raises(UsageError, match="no per-class value"):
        check_names(["accuracy[road] >= 0.5"])


def test_values_and_verdicts(summary):
    s, _ = summary
    miou = s["dataset"]["miou_pooled"]
    car = s["classes"][4]["iou"]
    rows = check_requirements(
        s,
        [
            f"miou_pooled >= {miou}",
            f"miou_pooled > {miou}",
            "iou[car] < 2",
            "iou[4] <= 0",
            "dice[road] > 0.5",
        ],
    )
    assert [r["passed"] for r in rows] == [True, False, True, False, True]
    assert rows[2]["value"] == car and rows[3]["value"] == car


def test_undefined_value_fails_with_reason(summary):
    s, _ = summary
    rows = check_requirements(s, ["kl_reverse_pooled < 100"])
    assert rows[0]["passed"] is False and rows[0]["reason"] == "undefined"
    s2 = copy.deepcopy(s)
    s2["classes"][0]["iou"] = None
    rows = check_requirements(s2, ["iou[road] >= 0", "iou[road] <= 1"])
    assert [r["reason"] for r in rows] == ["undefined", "undefined"]


def test_baseline_needs_same_settings(summary):
    s, _ = summary
    base = copy.deepcopy(s)
    base["dataset"]["miou_pooled"] -= 0.05
    assert check_requirements(s, ["miou_pooled >= baseline"], baseline=base)[0]["passed"]
    base["settings"]["eps"] = 1e-6
    base["settings"]["ignore_index"] = [0, 255]
    with pytest.raises(UsageError, match=r"eps: 1e-06 in the baseline, 1e-07 now.*ignore_index"):
        check_requirements(s, ["miou_pooled >= baseline"], baseline=base)
    rows = check_requirements(
        s, ["miou_pooled >= baseline"], baseline=base, allow_settings_change=True
    )
    assert rows[0]["passed"]
    with pytest.raises(UsageError, match="pass --baseline"):
        check_requirements(s, ["miou_pooled >= baseline"])


# --- CLI: exit codes, outputs -------------------------------------------------------------


def test_evaluate_exit_codes_in_process(tmp_path):
    ok = runner.invoke(app, [str(a) for a in sample_args("--require", "miou_pooled >= 0.5")])
    assert ok.exit_code == 0
    fail = runner.invoke(app, [str(a) for a in sample_args("--require", "miou_pooled >= 0.99")])
    assert fail.exit_code == 1 and "FAIL" in fail.stdout
    typo = runner.invoke(
        app, [str(a) for a in sample_args("--require", "mIoU >= 0.5", "--out", tmp_path / "r")]
    )
    assert typo.exit_code == 2 and "Valid names" in typo.stderr
    assert not (tmp_path / "r" / "summary.json").exists()


def test_requirements_land_in_summary_json(tmp_path):
    out = tmp_path / "r"
    result = runner.invoke(
        app,
        [
            str(a)
            for a in sample_args(
                "--out",
                out,
                "--require",
                "miou_pooled >= 0.99",
                "--require",
                "kl_reverse_pooled < 1",
            )
        ],
    )
    assert result.exit_code == 1
    reqs = json.loads((out / "summary.json").read_text())["requirements"]
    assert [(r["expr"], r["passed"]) for r in reqs] == [
        ("miou_pooled >= 0.99", False),
        ("kl_reverse_pooled < 1", False),
    ]
    assert reqs[1]["value"] is None and reqs[1]["reason"] == "undefined"


def test_junit_parses_and_counts_failures(tmp_path):
    junit = tmp_path / "gate.xml"
    result = runner.invoke(
        app,
        [
            str(a)
            for a in sample_args(
                "--require",
                "miou_pooled >= 0.5",
                "--require",
                "iou[car] > 0.99",
                "--require",
                "kl_reverse_pooled < 1",
                "--junit",
                junit,
            )
        ],
    )
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "miou_pooled >= 0.5",
        "iou[car] > 0.99",
        "kl_reverse_pooled < 1",
    ]
    assert [c.find("failure") is not None for c in cases] == [False, True, True]
    assert "undefined" in cases[2].find("failure").get("message")


def test_markdown_github_summary_and_annotations(tmp_path, monkeypatch):
    step = tmp_path / "step.md"
    step.write_text("earlier\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    md = tmp_path / "gate.md"
    result = runner.invoke(
        app,
        [
            str(a)
            for a in sample_args(
                "--require",
                "miou_pooled >= 0.5",
                "--require",
                "iou[car] > 0.99",
                "--markdown",
                md,
                "--github-summary",
            )
        ],
    )
    assert result.exit_code == 1
    text = md.read_text()
    assert "| `iou[car] > 0.99` |" in text and "❌ FAIL" in text and "✅ PASS" in text
    assert step.read_text() == "earlier\n" + text  # appended, not replaced
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 1 and "iou[car] > 0.99" in errors[0]


def test_json_stdout_stays_json_with_annotations(monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = runner.invoke(
        app, [str(a) for a in sample_args("--format", "json", "--require", "miou_pooled >= 0.99")]
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout)["requirements"][0]["passed"] is False
    assert "::error" in result.stderr


def test_gate_gives_the_same_verdict_as_evaluate(summary):
    s, path = summary
    exprs = ["miou_pooled >= 0.9", "iou[car] > 0.9", f"kl_pooled <= {s['dataset']['kl_pooled']}"]
    args = [x for e in exprs for x in ("--require", e)]
    evaluated = runner.invoke(app, [str(a) for a in sample_args(*args, "--format", "json")])
    gated = runner.invoke(app, ["gate", str(path), *args])
    assert evaluated.exit_code == gated.exit_code == 1
    verdicts = [r["passed"] for r in json.loads(evaluated.stdout)["requirements"]]
    assert verdicts == [r["passed"] for r in check_requirements(s, exprs)]


def test_gate_against_a_baseline_and_its_errors(summary, tmp_path):
    s, path = summary
    ok = runner.invoke(
        app,
        ["gate", str(path), "--require", "miou_pooled >= baseline - 0.01", "--baseline", str(path)],
    )
    assert ok.exit_code == 0
    other = copy.deepcopy(s)
    other["settings"]["smoothing"] = 0.1
    (tmp_path / "b.json").write_text(json.dumps(other))
    bad = runner.invoke(
        app,
        [
            "gate",
            str(path),
            "--require",
            "miou_pooled >= baseline",
            "--baseline",
            str(tmp_path / "b.json"),
        ],
    )
    assert bad.exit_code == 2 and "smoothing: 0.1 in the baseline, 0.0 now" in bad.stderr
    (tmp_path / "junk.json").write_text("{not json")
    junk = runner.invoke(app, ["gate", str(tmp_path / "junk.json"), "--require", "x > 1"])
    assert junk.exit_code == 2 and "junk.json" in junk.stderr and "not valid JSON" in junk.stderr
    none = runner.invoke(app, ["gate", str(path)])
    assert none.exit_code == 2


@pytest.mark.parametrize(
    "expr,code",
    [
        ("miou_pooled >= 0.5", 0),
        ("miou_pooled >= 0.99", 1),
        ("nope >= 1", 2),
        ("miou_pooled >>= 1", 2),
    ],
)
def test_gate_exit_codes_as_a_real_process(summary, expr, code):
    _, path = summary
    proc = subprocess.run(
        [sys.executable, "-m", "klseg_cli", "gate", str(path), "--require", expr],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == code, proc.stderr
    if code == 2:
        assert proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr


def test_evaluate_exit_1_as_a_real_process():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "klseg_cli",
            *map(str, sample_args("--require", "miou_pooled >= 0.99")),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
