"""Faults and hostile input, round two (issue #11): exit codes, one run's report, outputs
klseg must not replace, files that shrink or never end, and text from files kept as text.

Each test failed on the code before the fix; the concurrency and kill tests use real
subprocesses, the truncation tests a second process that truncates the file mid-read.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.render.report import REPORT_FILES

from ..conftest import random_probs

REPORT_NAMES = sorted(REPORT_FILES)  # what evaluate --out writes

runner = CliRunner()
H, W, C = 6, 8, 3
ROOT = Path(__file__).resolve().parents[2]


def probs(h=H, w=W, c=C, seed=0, dtype=np.float32):
    return random_probs(np.random.default_rng(seed), h * w, c, dtype=dtype).reshape(h, w, c)


def mask(h=H, w=W, c=C):
    return (np.arange(h * w) % c).reshape(h, w).astype(np.uint8)


def save_pair(pred_dir: Path, gt_dir: Path, stem="a", pred=None, labels=None):
    pred_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    np.save(pred_dir / f"{stem}.npy", probs() if pred is None else pred)
    Image.fromarray(mask() if labels is None else labels, mode="L").save(gt_dir / f"{stem}.png")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code=2, *needles):
    """Exactly one ``Error:`` line on stderr, the exit code, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def klseg(*args, env=None, user=None, timeout=60, **kw) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (optionally as another user, through ``setpriv``)."""
    cmd = [sys.executable, "-m", "klseg_cli", *map(str, args)]
    if user is not None:
        cmd = ["setpriv", "--reuid", user, "--regid", "nogroup", "--clear-groups", *cmd]
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT, **kw
    )


def sub_one_line(proc, code=2, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# --- exit codes -------------------------------------------------------------------------


def test_an_unexpected_exception_is_exit_3_with_one_line(tmp_path, monkeypatch):
    save_pair(tmp_path / "p", tmp_path / "g")

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("klseg_cli.engine.local.evaluate", boom)
    line = one_line(invoke("evaluate", tmp_path / "p", tmp_path / "g"), 3, "internal error")
    assert "RuntimeError: a bug" in line and "--debug" in line
    debug = invoke("evaluate", tmp_path / "p", tmp_path / "g", "--debug")
    assert isinstance(debug.exception, RuntimeError)  # --debug: the traceback


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate"],  # missing arguments
        ["evaluate", "a", "b", "--heatmaps", "many"],  # not an integer
        ["evaluate", "a", "b", "--no-such-option"],
        ["evaluate", "a", "b", "--input", "odds"],  # not a choice
        ["nosuchcommand"],
    ],
)
def test_click_usage_errors_are_one_line_exit_2(args):
    one_line(invoke(*args), 2)


def test_no_arguments_still_shows_the_help():
    result = invoke()
    assert "Usage" in result.output and "evaluate" in result.output


def test_heatmaps_must_not_be_negative(tmp_path):
    save_pair(tmp_path / "p", tmp_path / "g")
    out = tmp_path / "out"
    one_line(invoke("evaluate", tmp_path / "p", tmp_path / "g", "--out", out, "--heatmaps", -1))
    assert not out.exists()


@pytest.mark.parametrize("base", ["inf", "0.5", "1", "nan", "-2", "0", "two"])
def test_log_base_must_be_finite_and_above_1(tmp_path, base):
    save_pair(tmp_path / "p", tmp_path / "g")
    result = invoke("evaluate", tmp_path / "p", tmp_path / "g", "--log-base", base,
                    "--require", "kl_pooled <= 0")  # fmt: skip
    one_line(result, 2, "--log-base")


@pytest.mark.parametrize("base,factor", [("e", 1.0), ("2", 1 / np.log(2)), ("10", 1 / np.log(10))])
def test_log_base_by_name(tmp_path, base, factor):
    save_pair(tmp_path / "p", tmp_path / "g")
    out = invoke("evaluate", tmp_path / "p", tmp_path / "g", "--log-base", base,
                 "--format", "json")  # fmt: skip
    ref = invoke("evaluate", tmp_path / "p", tmp_path / "g", "--format", "json")
    assert out.exit_code == ref.exit_code == 0
    kl, kl_e = (json.loads(r.stdout)["dataset"]["kl_pooled"] for r in (out, ref))
    assert kl == pytest.approx(kl_e * factor, rel=1e-6)


@pytest.mark.parametrize("value", ["99999999999999999999", "-99999999999999999999"])
def test_ignore_index_out_of_range_is_a_usage_error(tmp_path, value):
    save_pair(tmp_path / "p", tmp_path / "g")
    one_line(invoke("evaluate", tmp_path / "p", tmp_path / "g", "--ignore-index", value), 2)
    one_line(invoke("heatmap", tmp_path / "p" / "a.npy", tmp_path / "g" / "a.png", "-o",
                    tmp_path / "x.png", "--ignore-index", value), 2)  # fmt: skip


# --- more than 256 classes on the NumPy path ----------------------------------------------


def test_argmax_classes_with_many_classes():
    from klseg_cli.core.metrics import argmax_classes

    rng = np.random.default_rng(3)
    for n_classes in (255, 256, 257, 300, 1000):
        P = rng.random((n_classes, 500)).astype(np.float32)
        P[:, 0] = 0.5  # a tie: lowest index wins
        conf, pred = argmax_classes(P)
        assert (pred == np.argmax(P, axis=0)).all() and (conf == P.max(axis=0)).all()


def test_300_classes_evaluate_smoothing_and_heatmap(tmp_path):
    n = 300
    labels = (np.arange(H * W) * 7 % n).reshape(H, W).astype(np.uint16)
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    pred_dir.mkdir()
    gt_dir.mkdir()
    np.save(pred_dir / "a.npy", probs(c=n))
    np.save(gt_dir / "a.npy", labels)
    for extra in ([], ["--smoothing", "0.1"]):
        result = invoke("evaluate", pred_dir, gt_dir, "--format", "json", *extra)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["n_valid"] == H * W
    hm = invoke("heatmap", pred_dir / "a.npy", gt_dir / "a.npy", "-o", tmp_path / "a.png",
                "--panel")  # fmt: skip
    assert hm.exit_code == 0, hm.output


# --- label TIFFs: compressed, tiled, several series ---------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"compression": "zlib"},
        {"tile": (16, 16)},
        {"tile": (16, 16), "compression": "zlib"},
        {"rowsperstrip": 5, "compression": "zlib"},
    ],
)
def test_compressed_and_tiled_label_tiffs(tmp_path, kw):
    h, w = 40, 36
    labels = mask(h, w)
    pred_dir, png_dir, tif_dir = tmp_path / "p", tmp_path / "png", tmp_path / "tif"
    save_pair(pred_dir, png_dir, pred=probs(h, w), labels=labels)
    tif_dir.mkdir()
    tifffile.imwrite(tif_dir / "a.tif", labels, **kw)
    a = invoke("evaluate", pred_dir, png_dir, "--format", "json")
    b = invoke("evaluate", pred_dir, tif_dir, "--format", "json")
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    assert json.loads(a.stdout)["dataset"] == json.loads(b.stdout)["dataset"]
    info = invoke("info", tif_dir / "a.tif")
    assert info.exit_code == 0 and "TiffSegments" not in info.stdout
    assert "label mask" in info.stdout and f"0: {np.count_nonzero(labels == 0)}" in info.stdout


def test_a_tiff_with_two_images_is_refused_naming_them(tmp_path):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    save_pair(pred_dir, gt_dir)
    with tifffile.TiffWriter(gt_dir / "a.tif") as tw:
        tw.write(mask())
        tw.write(np.zeros((3, 4), np.uint8))
    (gt_dir / "a.png").unlink()
    line = one_line(invoke("evaluate", pred_dir, gt_dir), 2, "a.tif", "2 images")
    assert "(6, 8)" in line and "(3, 4)" in line
    with tifffile.TiffWriter(pred_dir / "b.tif") as tw:  # a prediction map too
        tw.write(probs(), photometric="minisblack")
        tw.write(np.zeros((3, 4), np.float32))
    one_line(invoke("info", pred_dir / "b.tif"), 2, "b.tif", "2 images")


# --- a report is one run's report ---------------------------------------------------------


def visible(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative), hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_old_heatmaps_are_removed_and_nothing_else(tmp_path):
    pred_dir, gt_dir, out = tmp_path / "p", tmp_path / "g", tmp_path / "out"
    for i, stem in enumerate(("a", "b", "c")):
        save_pair(pred_dir, gt_dir, stem, pred=probs(seed=i))
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = invoke("evaluate", pred_dir, gt_dir, "--out", out, "--heatmaps", 3)
    assert first.exit_code == 0, first.output
    assert len(list((out / "heatmaps").glob("*.png"))) == 3
    (out / "heatmaps" / "keep.png").write_bytes(b"not klseg's")
    second = invoke("evaluate", pred_dir, gt_dir, "--out", out, "--heatmaps", 1)
    assert second.exit_code == 0
    assert (
        sorted(p.name for p in (out / "heatmaps").iterdir())
        == [
            "b_kl.png",  # the worst image only (seed 1 has the highest mean KL here)
            "keep.png",
        ]
        or len(list((out / "heatmaps").glob("*_kl.png"))) == 1
    )
    third = invoke("evaluate", pred_dir, gt_dir, "--out", out)
    assert third.exit_code == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["keep.png"]
    (out / "heatmaps" / "keep.png").unlink()
    fourth = invoke("evaluate", pred_dir, gt_dir, "--out", out, "--heatmaps", 1)
    assert fourth.exit_code == 0
    fifth = invoke("evaluate", pred_dir, gt_dir, "--out", out)
    assert fifth.exit_code == 0 and not (out / "heatmaps").exists()  # emptied: removed
    assert (out / "notes.txt").read_text() == "mine"
    names = [n for n in visible(out) if n != "notes.txt"]
    assert names == [".klseg-manifest.json", *REPORT_NAMES]


def test_publish_report_takes_any_files_and_folders(tmp_path):
    from klseg_cli.io.outputs import publish_report

    def fill(folder):
        (folder / "x.png").write_bytes(b"png")

    out = tmp_path / "r"
    publish_report(out, {"one.csv": "1\n", "summary.json": "{}\n"}, folders={"maps": fill})
    assert visible(out) == [".klseg-manifest.json", "maps/x.png", "one.csv", "summary.json"]
    publish_report(out, {"two.csv": "2\n", "summary.json": "{}\n"})
    assert visible(out) == [".klseg-manifest.json", "summary.json", "two.csv"]


WORKER = r"""
import fcntl, os, sys, time
from pathlib import Path
from typer.testing import CliRunner
from klseg_cli.cli.root import app
from tests.cli.test_faults import check_one_run

pred, gt, out, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
barrier, n_writers = Path(sys.argv[5]), int(sys.argv[6])
runner = CliRunner()
(barrier / str(os.getpid())).touch()  # start together, once everyone is imported
while len(os.listdir(barrier)) < n_writers:
    time.sleep(0.005)
for _ in range(rounds):
    r = runner.invoke(app, ["evaluate", pred, gt, "--out", str(out), "--heatmaps", "1",
                            "--junit", str(out / "gate.xml"), "--require", "kl_pooled >= 0",
                            "--format", "json"])
    if r.exit_code != 0:
        print(r.output, file=sys.stderr)
        sys.exit(9)
    fd = os.open(out, os.O_RDONLY)  # look while no writer holds the folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        check_one_run(out)
    finally:
        os.close(fd)
"""


def check_one_run(out: Path) -> str:
    """The report in ``out`` is one run's: every file names the same run (its prefix)."""
    summary = json.loads((out / "summary.json").read_text())
    stems = {row["image"] for row in summary["images"]}
    prefixes = {s.split("_")[0] for s in stems}
    assert len(prefixes) == 1, stems
    (prefix,) = prefixes
    rows = list(csv.DictReader(io.StringIO((out / "per_image.csv").read_text())))
    assert {r["image"] for r in rows} == stems
    assert [float(r["kl"]) for r in rows] == [row["kl"] for row in summary["images"]]
    classes = list(csv.DictReader(io.StringIO((out / "per_class.csv").read_text())))
    assert [float(r["n_target"]) for r in classes] == [c["n_target"] for c in summary["classes"]]
    maps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert len(maps) == 1 and maps[0].startswith(prefix), (maps, prefix)
    junit = ET.parse(out / "gate.xml").getroot()
    assert junit.find(".//system-out").text == f"kl_pooled = {summary['dataset']['kl_pooled']:.6g}"
    leftovers = [
        p.name for p in out.iterdir() if p.name.startswith(".") and "manifest" not in p.name
    ]
    assert not leftovers, leftovers
    return prefix


@pytest.mark.parametrize("n_writers", [2, 3])
def test_concurrent_runs_into_one_folder_leave_one_runs_report(tmp_path, n_writers):
    """Two or three processes, each evaluating its own data into one DIR, 40 rounds each;
    after each of its runs a writer checks (holding the folder) that the report is one
    run's, and so does the test at the end."""
    out = tmp_path / "out"
    args = []
    for k in range(n_writers):
        pred_dir, gt_dir = tmp_path / f"p{k}", tmp_path / f"g{k}"
        for i in range(2 + k):  # different image counts, values and class counts
            save_pair(pred_dir, gt_dir, f"w{k}_{i}", pred=probs(c=3 + k, seed=10 * k + i),
                      labels=mask(c=3 + k))  # fmt: skip
        args.append((pred_dir, gt_dir))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen = set()
    for batch in range(2):  # 2 batches x 20 rounds per writer: 40 rounds
        barrier = tmp_path / f"barrier{batch}"
        barrier.mkdir()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(p),
                    str(g),
                    str(out),
                    "20",
                    str(barrier),
                    str(n_writers),
                ],
                env=env,
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
            )
            for p, g in args
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        seen.add(check_one_run(out))
    assert seen <= {f"w{k}" for k in range(n_writers)}


KILLABLE = r"""
import signal, sys, time
import klseg_cli.commands.heatmap as hm
from klseg_cli.cli import root as cli

# a background job of a shell without job control starts with SIGINT ignored (POSIX), and
# Python keeps that: restore Ctrl-C's usual meaning, as in a terminal
signal.signal(signal.SIGINT, signal.default_int_handler)

real = hm.render
def slow(*a, **k):
    out = real(*a, **k)
    sys.stderr.write("RENDERED\n"); sys.stderr.flush()
    time.sleep(30)  # a long heatmap: the signal arrives here
    return out
hm.render = slow
sys.argv = ["klseg"] + sys.argv[1:]
cli.main()
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_run_killed_during_heatmaps_changes_nothing(tmp_path, sig, code):
    pred_dir, gt_dir, out = tmp_path / "p", tmp_path / "g", tmp_path / "out"
    for i in range(3):
        save_pair(pred_dir, gt_dir, f"s{i}", pred=probs(seed=i))
    first = invoke("evaluate", pred_dir, gt_dir, "--out", out, "--heatmaps", 2)
    assert first.exit_code == 0
    before = {name: (out / name).read_bytes() for name in visible(out)}
    for i in range(3):  # other data: a completed run would change every file
        np.save(pred_dir / f"s{i}.npy", probs(seed=100 + i))
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), "evaluate", str(pred_dir), str(gt_dir), "--out", str(out),
         "--heatmaps", "2"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stderr.readline()
    assert "RENDERED" in line, line + proc.stderr.read()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().startswith("Error: ") and "no report was written" in err
    assert {name: (out / name).read_bytes() for name in visible(out)} == before


# --- never overwrite what is not ours -----------------------------------------------------


@pytest.fixture
def pair_dirs(tmp_path):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    save_pair(pred_dir, gt_dir)
    return pred_dir, gt_dir, tmp_path / "out"


@pytest.mark.parametrize("name", ["summary.json", "per_image.csv", ".klseg-manifest.json"])
def test_junit_or_markdown_on_a_report_file_is_a_usage_error(pair_dirs, name):
    pred_dir, gt_dir, out = pair_dirs
    for option in ("--junit", "--markdown"):
        result = invoke("evaluate", pred_dir, gt_dir, "--out", out, option, out / name,
                        "--require", "kl_pooled >= 0")  # fmt: skip
        one_line(result, 2, option, name)
        assert not out.exists()


def test_junit_and_markdown_on_one_file_is_a_usage_error(pair_dirs, tmp_path):
    pred_dir, gt_dir, _ = pair_dirs
    same = tmp_path / "gate.txt"
    one_line(invoke("evaluate", pred_dir, gt_dir, "--junit", same, "--markdown", same,
                    "--require", "kl_pooled >= 0"), 2, "--markdown")  # fmt: skip
    link = tmp_path / "link.txt"
    link.symlink_to(same)
    one_line(invoke("evaluate", pred_dir, gt_dir, "--junit", same, "--markdown", link,
                    "--require", "kl_pooled >= 0"), 2, "--markdown")  # fmt: skip
    assert not same.exists()


def test_an_output_symlink_is_written_through_never_replaced(pair_dirs, tmp_path):
    pred_dir, gt_dir, out = pair_dirs
    real_dir = tmp_path / "elsewhere"
    real_dir.mkdir()
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    junit.symlink_to(real_dir / "real.xml")  # dangling until written
    (real_dir / "real.md").write_text("old")
    md.symlink_to(real_dir / "real.md")
    out.mkdir()
    (real_dir / "summary.json").write_text("old")
    (out / "summary.json").symlink_to(real_dir / "summary.json")
    result = invoke("evaluate", pred_dir, gt_dir, "--out", out, "--junit", junit, "--markdown",
                    md, "--require", "kl_pooled >= 0")  # fmt: skip
    assert result.exit_code == 0, result.output
    for link in (junit, md, out / "summary.json"):
        assert link.is_symlink(), link
    ET.parse(real_dir / "real.xml")
    assert "klseg" in (real_dir / "real.md").read_text()
    assert json.loads((real_dir / "summary.json").read_text())["n_images"] == 1
    gate = invoke("gate", out / "summary.json", "--require", "kl_pooled >= 0", "--junit", junit)
    assert gate.exit_code == 0 and junit.is_symlink()


def test_a_fifo_output_is_written_as_a_stream(pair_dirs, tmp_path):
    pred_dir, gt_dir, _ = pair_dirs
    fifo = tmp_path / "pipe.xml"
    os.mkfifo(fifo)
    got = []

    def reader():
        with open(fifo, "rb") as fh:
            got.append(fh.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    result = invoke("evaluate", pred_dir, gt_dir, "--junit", fifo, "--require", "kl_pooled >= 0")
    thread.join(timeout=20)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO, not a file put there
    assert got and ET.fromstring(got[0]).tag == "testsuites"


def test_a_link_to_a_special_file_is_streamed_into(pair_dirs, tmp_path):
    pred_dir, gt_dir, _ = pair_dirs
    null, full = tmp_path / "null.md", tmp_path / "full.md"
    null.symlink_to("/dev/null")
    full.symlink_to("/dev/full")
    ok = invoke("evaluate", pred_dir, gt_dir, "--markdown", null, "--require", "kl_pooled >= 0")
    assert ok.exit_code == 0 and null.is_symlink() and os.readlink(null) == "/dev/null"
    disk_full = invoke("evaluate", pred_dir, gt_dir, "--markdown", full, "--require",
                       "kl_pooled >= 0")  # fmt: skip
    one_line(disk_full, 2, "full.md", "No space left on device")
    assert full.is_symlink() and os.readlink(full) == "/dev/full"


def test_output_os_errors_are_one_line_exit_2(pair_dirs, tmp_path):
    pred_dir, gt_dir, _ = pair_dirs
    gate = ("--require", "kl_pooled >= 0")
    (tmp_path / "no").write_text("a file where a folder belongs")
    missing = tmp_path / "no" / "such" / "dir" / "gate.xml"  # missing parents are made (P15)
    one_line(invoke("evaluate", pred_dir, gt_dir, "--junit", missing, *gate), 2, missing,
             "is a file, not a folder")  # fmt: skip
    one_line(invoke("evaluate", pred_dir, gt_dir, "--out", "/proc/klseg-report"), 2,
             "/proc/klseg-report")  # fmt: skip
    one_line(invoke("evaluate", pred_dir, gt_dir, "--markdown", "/proc/self/klseg.md", *gate),
             2, "/proc/self/klseg.md")  # fmt: skip
    one_line(invoke("heatmap", pred_dir / "a.npy", gt_dir / "a.png", "-o",
                    missing.with_suffix(".png")), 2, "gate.png")  # fmt: skip
    one_line(invoke("heatmap", pred_dir / "a.npy", gt_dir / "a.png", "-o", tmp_path / "x.png",
                    "--raw", tmp_path / "x.png"), 2, "--raw")  # fmt: skip
    summary = tmp_path / "s" / "summary.json"
    assert invoke("evaluate", pred_dir, gt_dir, "--out", summary.parent).exit_code == 0
    one_line(invoke("gate", summary, *gate, "--junit", "/proc/self/gate.xml"), 2, "gate.xml")
    for path in ("/proc/self", "/proc"):  # nothing was left behind there either
        assert not [n for n in os.listdir(path) if n.startswith(".")]


def can_setpriv() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                            "--clear-groups", sys.executable, "-c", "import klseg_cli"],
                           capture_output=True, cwd=ROOT)  # fmt: skip
    return probe.returncode == 0


@pytest.fixture
def shared_dir():
    """A folder user ``nobody`` can enter (pytest's tmp_path is root's, mode 700)."""
    path = Path(tempfile.mkdtemp(prefix="klseg-faults-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not can_setpriv(), reason="needs root and setpriv to run as 'nobody'")
def test_permission_errors_as_another_user(shared_dir):
    """Run as ``nobody``: unreadable class file folder, prediction folder without x, an
    --out and a --junit where nobody may write: each one line, exit 2, no traceback."""
    pred_dir, gt_dir = shared_dir / "p", shared_dir / "g"
    save_pair(pred_dir, gt_dir)
    for p in (pred_dir, gt_dir, *pred_dir.iterdir(), *gt_dir.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    secret = shared_dir / "secret"
    secret.mkdir(mode=0o700)
    (secret / "classes.txt").write_text("a\nb\nc\n")
    proc = klseg("evaluate", pred_dir, gt_dir, "--classes", secret / "classes.txt", user="nobody")
    sub_one_line(proc, 2, "classes.txt", "Permission denied")
    closed = shared_dir / "closed"
    shutil.copytree(pred_dir, closed)
    closed.chmod(0o644)  # readable, but no execute: its files cannot be opened
    proc = klseg("evaluate", closed, gt_dir, user="nobody")
    sub_one_line(proc, 2, "closed", "Permission denied")
    proc = klseg("evaluate", pred_dir, gt_dir, "--out", secret / "report", user="nobody")
    sub_one_line(proc, 2, "report", "Permission denied")
    proc = klseg("evaluate", pred_dir, gt_dir, "--require", "kl_pooled >= 0", "--junit",
                 secret / "gate.xml", user="nobody")  # fmt: skip
    sub_one_line(proc, 2, "gate.xml", "Permission denied")
    (pred_dir / "a.npy").chmod(0o600)  # root's file, unreadable to nobody
    proc = klseg("evaluate", pred_dir, gt_dir, user="nobody")
    sub_one_line(proc, 2, "a.npy", "Permission denied")
    proc = klseg("info", pred_dir / "a.npy", user="nobody")
    sub_one_line(proc, 2, "a.npy", "Permission denied")  # klseg's reader says it


# --- files that never end, are not files, or are too big ----------------------------------


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo.npy"
    os.mkfifo(path)
    return path


def test_special_files_as_inputs_are_not_regular_files(pair_dirs, fifo):
    pred_dir, gt_dir, _ = pair_dirs
    for bad in ("/dev/zero", fifo):
        one_line(invoke("evaluate", bad, gt_dir / "a.png"), 2, bad, "not a regular file")
        one_line(invoke("evaluate", pred_dir / "a.npy", bad), 2, bad, "not a regular file")
        one_line(invoke("heatmap", bad, "-o", pred_dir / "x.png", "--metric", "entropy"), 2, bad)
    png_fifo = fifo.with_name("fifo.png")
    os.mkfifo(png_fifo)
    one_line(invoke("evaluate", pred_dir / "a.npy", png_fifo), 2, "not a regular file")


def test_info_on_a_fifo_returns_at_once(fifo):
    proc = klseg("info", fifo, timeout=30)  # blocked forever before
    sub_one_line(proc, 2, "fifo.npy", "FIFO")
    proc = klseg("info", "/dev/zero", timeout=30)
    sub_one_line(proc, 2, "/dev/zero")


@pytest.fixture
def summary_path(pair_dirs):
    pred_dir, gt_dir, out = pair_dirs
    assert invoke("evaluate", pred_dir, gt_dir, "--out", out).exit_code == 0
    return out / "summary.json"


def test_baseline_and_classes_from_special_or_huge_files(pair_dirs, summary_path, fifo):
    pred_dir, gt_dir, _ = pair_dirs
    gate = ("--require", "kl_pooled <= baseline")
    for bad in ("/dev/zero", fifo):
        one_line(invoke("gate", summary_path, *gate, "--baseline", bad), 2, bad)
        one_line(invoke("gate", bad, "--require", "kl_pooled <= 1"), 2, bad)
        one_line(invoke("evaluate", pred_dir, gt_dir, "--classes", bad), 2, bad)
    huge = summary_path.with_name("huge.json")
    with open(huge, "wb") as fh:  # sparse: 300 MB claimed, nothing stored
        fh.truncate(300 << 20)
    one_line(invoke("gate", summary_path, *gate, "--baseline", huge), 2, "huge.json", "MiB")
    one_line(invoke("evaluate", pred_dir, gt_dir, "--classes", huge), 2, "huge.json", "MiB")


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda s: s.update(settings=[1, 2]), "settings"),
        (lambda s: s["classes"][0].pop("iou"), "classes[0]"),
        (lambda s: s["classes"][0].pop("class_name"), "class_name"),
        (lambda s: s["classes"].__setitem__(0, "road"), "classes[0]"),
        (lambda s: s["dataset"].__setitem__("kl_pooled", "0.3"), "kl_pooled"),
        (lambda s: s["classes"][1].__setitem__("iou", {"v": 1}), "iou"),
        (lambda s: s["dataset"].__setitem__("kl_pooled", 10**400), "kl_pooled"),
        (lambda s: s.__setitem__("n_images", "three"), "n_images"),
    ],
)
def test_summary_schema_violations_are_one_line(summary_path, change, needle):
    data = json.loads(summary_path.read_text())
    change(data)
    summary_path.write_text(json.dumps(data))
    reqs = ("--require", "kl_pooled <= 9", "--require", "iou[0] >= 0", "--markdown", "/dev/null")
    one_line(invoke("gate", summary_path, *reqs), 2, "summary.json", needle)


@pytest.mark.parametrize(
    "text", ['{"dataset": {"kl_pooled": ' + "9" * 4301 + '}, "classes": []}', "[" * 100000]
)
def test_summaries_python_json_cannot_hold(summary_path, text):
    summary_path.write_text(text)
    one_line(invoke("gate", summary_path, "--require", "kl_pooled <= 9"), 2, "summary.json")


# --- files truncated while klseg reads them: no SIGBUS -------------------------------------

TRUNCATE_DURING = r"""
import os, subprocess, sys
from klseg_cli.cli import root as cli
from klseg_cli.core.labels import LabelSpec

victim, when = sys.argv[1], sys.argv[2]

def truncate():
    # another process shrinks the file, as a pipeline rewriting it would
    subprocess.run(["truncate", "-s", "200", victim], check=True)

if when == "labels":  # after the files are opened, before the target's labels are checked
    real = LabelSpec.check
    def hooked(*a, **k):
        truncate()
        return real(*a, **k)
    LabelSpec.check = hooked
else:  # during the first pread of the file: the read comes back short
    import klseg_cli.io.safeio as safeio
    real_preadv = os.preadv
    done = []
    def preadv(fd, buffers, offset):
        if not done:
            done.append(1)
            truncate()
        return real_preadv(fd, buffers, offset)
    safeio.os = type(os)("os_hooked")
    safeio.os.__dict__.update(os.__dict__)
    safeio.os.preadv = preadv
sys.argv = ["klseg"] + sys.argv[3:]
cli.main()
"""


def run_truncating(tmp_path, victim, when, *args):
    script = tmp_path / "truncating.py"
    script.write_text(TRUNCATE_DURING)
    return subprocess.run(
        [sys.executable, str(script), str(victim), when, *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["npy", "tif"])
def test_a_label_file_truncated_after_opening_is_no_sigbus(tmp_path, fmt):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    h, w = 512, 512
    save_pair(pred_dir, gt_dir, pred=probs(h, w), labels=mask(h, w))
    (gt_dir / "a.png").unlink()
    victim = gt_dir / f"a.{fmt}"
    if fmt == "npy":
        np.save(victim, mask(h, w))
    else:
        tifffile.imwrite(victim, mask(h, w))
    proc = run_truncating(tmp_path, victim, "labels", "evaluate", pred_dir, gt_dir)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}"  # SIGBUS before
    assert proc.returncode in (0, 2), proc.stderr  # read whole before the truncation: fine


def test_a_label_npy_truncated_during_the_read_ended_early(tmp_path):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    h, w = 512, 512
    save_pair(pred_dir, gt_dir, pred=probs(h, w), labels=mask(h, w))
    (gt_dir / "a.png").unlink()
    np.save(gt_dir / "a.npy", mask(h, w))
    proc = run_truncating(tmp_path, gt_dir / "a.npy", "pread", "evaluate", pred_dir, gt_dir)
    sub_one_line(proc, 2, "a.npy", "file ended early")


@pytest.mark.parametrize("order", ["F", "C"])
def test_a_map_truncated_after_opening_ended_early(tmp_path, order):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    h, w = 256, 256
    save_pair(pred_dir, gt_dir, pred=np.asarray(probs(h, w), order=order), labels=mask(h, w))
    victim = pred_dir / "a.npy"
    proc = run_truncating(tmp_path, victim, "labels", "evaluate", pred_dir, gt_dir)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}"  # SIGBUS before (F)
    sub_one_line(proc, 2, "a.npy", "file ended early")


# --- Fortran-order maps: same numbers, linear time, bounded memory -------------------------


@pytest.mark.parametrize("layout", ["hwc", "chw", "hw"])
def test_fortran_order_maps_give_the_c_order_numbers(tmp_path, layout):
    h, w, c = 37, 53, 4
    p = probs(h, w, c, seed=5)
    if layout == "chw":
        p = np.moveaxis(p, -1, 0)
    elif layout == "hw":
        p, c = p[..., 1] / (p[..., 0] + p[..., 1]), 2
    labels = mask(h, w, c)
    outs = []
    for order in ("C", "F"):
        pred_dir, gt_dir = tmp_path / order / "p", tmp_path / order / "g"
        save_pair(pred_dir, gt_dir, pred=np.asarray(p, order=order), labels=labels)
        result = invoke("evaluate", pred_dir, gt_dir, "--format", "json", "--chunk-pixels", 100)
        assert result.exit_code == 0, result.output
        outs.append(json.loads(result.stdout))
    assert outs[0]["dataset"] == outs[1]["dataset"] and outs[0]["images"] == outs[1]["images"]


def test_fortran_order_maps_read_in_bounded_memory_and_linear_time(tmp_path):
    import tracemalloc

    from klseg_cli.io.readers import open_prediction

    h, w, c = 2048, 1024, 4  # 32 MB of float32: each chunk copied the whole map before
    np.save(tmp_path / "f.npy", np.asfortranarray(probs(h, w, c)))
    pm = open_prediction(tmp_path / "f.npy", hw=(h, w))
    step = 1 << 15
    tracemalloc.start()
    t0 = time.perf_counter()
    total = 0.0
    for start in range(0, pm.n_pixels, step):
        total += float(pm.block(start, min(start + step, pm.n_pixels)).sum(dtype=np.float64))
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == pytest.approx(h * w, rel=1e-4)
    assert peak < 24 << 20, f"peak {peak / 2**20:.0f} MiB for a 32 MiB map"
    assert seconds < 10, seconds  # 64 chunks; the quadratic read took minutes at this size


# --- untrusted text stays text ------------------------------------------------------------


def test_markup_in_class_names_and_paths_is_shown_as_written(tmp_path):
    pred_dir, gt_dir = tmp_path / "p[", tmp_path / "g"
    save_pair(pred_dir, gt_dir, stem="]x")  # the path holds "p[/]x.npy"
    save_pair(tmp_path / "extra", gt_dir, stem="]y")  # a target with no prediction: a warning
    names = tmp_path / "names.txt"
    names.write_text("[bold]road\n[/]\ncar[/bold]\n")
    result = invoke("evaluate", pred_dir, gt_dir, "--classes", names, "--allow-missing",
                    "--require", "iou[1] >= 0")  # fmt: skip
    assert result.exit_code == 0, result.output
    for text in ("[bold]road", "car[/bold]", "[/]"):
        assert text in result.stdout, text
    assert "]y.png" in result.stderr  # the warning names the path, markup and all
    info = invoke("info", pred_dir / "]x.npy")
    assert info.exit_code == 0 and "p[/]x" in info.stdout  # the title wraps after this
    hm = invoke("heatmap", pred_dir / "]x.npy", gt_dir / "]x.png", "-o", pred_dir / "]o.png")
    assert hm.exit_code == 0 and "p[/]o.png" in hm.stderr.replace("\n", ""), hm.output


def test_control_characters_in_class_names_keep_junit_well_formed(tmp_path):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    save_pair(pred_dir, gt_dir)
    names = tmp_path / "names.txt"
    names.write_text("ro\x01ad\ncar\x1b[31m\nsky\x7f\n")
    junit = tmp_path / "gate.xml"
    result = invoke("evaluate", pred_dir, gt_dir, "--classes", names, "--junit", junit,
                    "--require", "iou[ro\x01ad] >= 2", "--require", "dice[car\x1b[31m] >= 0",
                    "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 1, result.output
    root = ET.parse(junit).getroot()  # well-formed XML 1.0
    assert [c.get("name") for c in root.iter("testcase")] == [
        "iou[ro\\x01ad] >= 2",
        "dice[car\\x1b[31m] >= 0",
    ]
    assert "\x1b" not in result.stdout  # no terminal escape sequences from a file
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["classes"][0]["class_name"] == "ro\x01ad"  # JSON keeps the data exact


def test_csv_cells_with_cr_and_formulas(tmp_path):
    pred_dir, gt_dir, out = tmp_path / "p", tmp_path / "g", tmp_path / "out"
    stems = ["a\rb", "=HYPERLINK(1)", "+1", "-2", "@SUM(A1)", "plain"]
    for i, stem in enumerate(stems):
        save_pair(pred_dir, gt_dir, stem, pred=probs(seed=i))
    names = tmp_path / "names.txt"
    names.write_text("=cmd|' /C calc'!A0\n-road\nsky\n")
    result = invoke("evaluate", pred_dir, gt_dir, "--out", out, "--classes", names)
    assert result.exit_code == 0, result.output
    with open(out / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(stems)
    shown = {r["image"] for r in rows}
    assert shown == {"a\rb", "'=HYPERLINK(1)", "'+1", "'-2", "'@SUM(A1)", "plain"}
    assert all(float(r["kl"]) >= 0 for r in rows)  # numbers are numbers, never prefixed
    with open(out / "per_class.csv", newline="") as fh:
        classes = [r["class_name"] for r in csv.DictReader(fh)]
    assert classes == ["'=cmd|' /C calc'!A0", "'-road", "sky"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(r["image"] for r in summary["images"]) == sorted(stems)  # JSON: as is


SIGNAL_WHILE_PUBLISHING = r"""
import os, signal, sys
import klseg_cli.io.outputs as outputs
from klseg_cli.cli import root as cli

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see KILLABLE)
real = outputs.install_file
SIG = getattr(signal, sys.argv[1])
def install(src, dest):
    if not getattr(install, "sent", False):
        install.sent = True
        os.kill(os.getpid(), SIG)  # arrives mid-publish
    return real(src, dest)
outputs.install_file = install
sys.argv = ["klseg"] + sys.argv[2:]
cli.main()
"""


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_publishing_waits_for_the_whole_report(pair_dirs, tmp_path, sig, code):
    pred_dir, gt_dir, out = pair_dirs
    script = tmp_path / "publishing.py"
    script.write_text(SIGNAL_WHILE_PUBLISHING)
    proc = subprocess.run(
        [sys.executable, str(script), sig, "evaluate", str(pred_dir), str(gt_dir), "--out",
         str(out), "--heatmaps", "1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    sub_one_line(proc, code, "completed first")
    assert visible(out) == [".klseg-manifest.json", *sorted([*REPORT_NAMES, "heatmaps/a_kl.png"])]


def test_a_closed_stdout_is_not_exit_1(pair_dirs):
    pred_dir, gt_dir, _ = pair_dirs
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "klseg_cli", "evaluate", str(pred_dir), str(gt_dir), "--format",
         "json"] + ["--require", "kl_pooled >= 0"] * 3000,
        stdout=reader.stdin, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    reader.stdin.close()
    _, err = proc.communicate(timeout=60)
    reader.stdout.read()
    reader.wait(timeout=60)
    assert proc.returncode in (0, 141), err  # never 1 (a failed gate) or 3


def test_junit_to_dev_stdout_streams_and_leaves_the_link(pair_dirs):
    """As root, this replaced the system's /dev/stdout link with a file before the fix."""
    pred_dir, gt_dir, _ = pair_dirs
    before = os.readlink("/dev/stdout")
    proc = klseg("evaluate", pred_dir, gt_dir, "--require", "kl_pooled >= 0", "--junit",
                 "/dev/stdout", "--markdown", "/dev/stderr")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert os.path.islink("/dev/stdout") and os.readlink("/dev/stdout") == before
    xml = proc.stdout[proc.stdout.index("<?xml") :]
    assert ET.fromstring(xml.split("\n", 1)[1]).tag == "testsuites"
    assert "## klseg: all requirements hold" in proc.stderr
