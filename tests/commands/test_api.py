"""The public accumulator (klseg_cli.Evaluator): the CLI's numbers from arrays."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

import klseg_cli
from klseg_cli.cli.root import app
from klseg_cli.commands.evaluator import Evaluator
from klseg_cli.errors import LabelError, ShapeError, UsageError

from ..conftest import random_probs

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


def same(a, b) -> bool:
    """Equal to the last digit, NaN equal to NaN (summary.json writes it as null)."""
    a, b = (math.nan if v is None else v for v in (a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def sample_arrays():
    """(stem, prediction, labels) of sample_data, read as a user's own code would."""
    out = []
    for gt in sorted((SAMPLE / "ground_truth").glob("*.png")):
        pred = next((SAMPLE / "predictions").glob(gt.stem + ".*"))
        arr = tifffile.imread(pred) if pred.suffix == ".tif" else np.load(pred)
        out.append((gt.stem, arr, np.asarray(Image.open(gt))))
    return out


def cli_summary(tmp_path) -> dict:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"),
         "--classes", str(SAMPLE / "classes.txt"), "--out", str(out), "--jobs", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def test_evaluator_gives_the_cli_numbers_on_sample_data(tmp_path):
    summary = cli_summary(tmp_path)
    names = (SAMPLE / "classes.txt").read_text().split()
    ev = klseg_cli.Evaluator(classes=names)
    for stem, pred, labels in sample_arrays():
        ev.update(pred, labels, stems=stem)
    got = json.loads(json.dumps(ev.compute()))
    for key in ("dataset", "classes", "images", "n_valid", "n_images", "settings"):
        assert same(got[key], summary[key]), key


def test_batches_merge_and_pickle_give_the_same_numbers(rng):
    C, N, H, W = 4, 6, 9, 11
    P = random_probs(rng, N * H * W, C).reshape(N, H, W, C)
    y = rng.integers(0, C, size=(N, H, W))
    y[0, :2] = 255
    one = Evaluator(C)
    for i in range(N):
        one.update(np.moveaxis(P[i], -1, 0), y[i], stems=str(i))  # (C, H, W)
    batched = Evaluator(C)
    batched.update(P[:3], y[:3], stems=["0", "1", "2"])  # (N, H, W, C)
    other = pickle.loads(pickle.dumps(Evaluator(C)))
    other.update(np.moveaxis(P[3:], -1, 1), y[3:], stems=["3", "4", "5"])  # (N, C, H, W)
    batched.merge(pickle.loads(pickle.dumps(other)))
    assert same(one.compute(), batched.compute())
    assert len(pickle.dumps(batched)) < 64_000  # sums (ECE and view bins) and rows, no pixels
    batched.reset()
    assert batched.n_images == 0 and batched.total.n_valid == 0


class OnlyArray:
    """Anything with ``__array__`` (as a CPU torch tensor has)."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a


class OnlyDlpack:
    """Anything with only ``__dlpack__`` (a JAX or CuPy-like array on the CPU)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_array_protocols(rng):
    C, H, W = 3, 8, 5
    P = random_probs(rng, H * W, C).T.reshape(C, H, W).copy()
    y = rng.integers(0, C, size=(H, W))
    ref = Evaluator(C)
    ref.update(P, y)
    for wrap in (OnlyArray, OnlyDlpack):
        ev = Evaluator(C)
        ev.update(wrap(P), wrap(y))
        assert same(ev.compute(), ref.compute())


def test_torch_tensor_if_installed(rng):
    torch = pytest.importorskip("torch")
    C, H, W = 3, 8, 5
    P = random_probs(rng, H * W, C).T.reshape(1, C, H, W).copy()
    y = rng.integers(0, C, size=(1, H, W))
    ref = Evaluator(C)
    ref.update(P, y)
    ev = Evaluator(C)
    ev.update(torch.from_numpy(P), torch.from_numpy(y))
    assert same(ev.compute(), ref.compute())


def test_large_float32_map_takes_the_kernel_and_matches_numpy(rng):
    C, H, W = 4, 64, 48
    P = random_probs(rng, H * W, C).T.reshape(C, H, W).copy()
    y = rng.integers(0, C, size=(H, W))
    fast, slow = Evaluator(C, accelerate=True), Evaluator(C, accelerate=False)
    fast.update(P, y)
    slow.update(P, y)
    a, b = fast.compute()["dataset"], slow.compute()["dataset"]
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9, nan_ok=True), k


def test_errors_are_klseg_errors(rng, tmp_path):
    ev = Evaluator(3)
    with pytest.raises(UsageError, match="not paths"):
        ev.update("preds/a.npy", np.zeros((2, 2), np.uint8))
    with pytest.raises(UsageError, match="must be an array"):
        ev.update(object(), np.zeros((2, 2), np.uint8))
    with pytest.raises(LabelError, match="labels must be integers"):
        ev.update(np.full((3, 4, 4), 1 / 3, np.float32), np.zeros((4, 4), np.float32))
    with pytest.raises(ShapeError):
        ev.update(np.full((3, 4, 4), 1 / 3, np.float32), np.zeros((5, 4), np.uint8))
    with pytest.raises(ShapeError, match="expected 3"):
        ev.update(np.full((4, 5, 5), 1 / 4, np.float32), np.zeros((5, 5), np.uint8))
    with pytest.raises(UsageError, match="Evaluator"):
        klseg_cli.evaluate(np.zeros((3, 4, 4)), np.zeros((4, 4)))
    with pytest.raises(UsageError, match="different settings"):
        Evaluator(3).merge(Evaluator(3, eps=1e-5))


def test_from_result_and_soft_targets(rng, tmp_path):
    C, H, W = 3, 12, 10
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    preds, targets = [], []
    for i in range(3):
        P = random_probs(rng, H * W, C).reshape(H, W, C)
        Q = random_probs(rng, H * W, C, sharp=1.0).reshape(H, W, C)
        np.save(tmp_path / "p" / f"s{i}.npy", P)
        np.save(tmp_path / "q" / f"s{i}.npy", Q)
        preds.append(P)
        targets.append(Q)
    result = klseg_cli.evaluate(tmp_path / "p", tmp_path / "q", soft_gt=True, jobs=1)
    summary = result.summary()
    ev = Evaluator(C, soft_gt=True)
    ev.update(np.stack(preds), np.stack(targets), stems=["s0", "s1", "s2"])
    got = ev.compute()
    assert same(got["dataset"], summary["dataset"]) and same(got["images"], summary["images"])
    assert same(Evaluator.from_result(result).compute()["dataset"], summary["dataset"])


def test_klseg_never_imports_torch():
    """A DLPack or __array__ object is read without importing its library."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, klseg_cli\n"
        "class T:\n"
        "    def __init__(s, a): s.a = a\n"
        "    def __dlpack__(s, **k): return s.a.__dlpack__(**k)\n"
        "    def __dlpack_device__(s): return s.a.__dlpack_device__()\n"
        "ev = klseg_cli.Evaluator(2)\n"
        "ev.update(T(np.full((2, 3, 3), 0.5, np.float32)), T(np.zeros((3, 3), np.int64)))\n"
        "assert ev.compute()['n_valid'] == 9\n"
        "bad = [m for m in ('torch', 'jax', 'tensorflow', 'cupy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_strided_maps_are_read_in_their_stored_order(rng):
    """A channels-last (N, C, H, W) view (torch's channels_last) gives the same numbers."""
    C, N, H, W = 3, 2, 7, 9
    P = random_probs(rng, N * H * W, C).reshape(N, H, W, C)
    y = rng.integers(0, C, size=(N, H, W))
    ref, strided = Evaluator(C), Evaluator(C)
    ref.update(np.ascontiguousarray(np.moveaxis(P, -1, 1)), y)
    view = np.moveaxis(P, -1, 1)  # (N, C, H, W) over HWC memory
    assert not view[0].flags.c_contiguous
    strided.update(view, y)
    assert same(ref.compute(), strided.compute())
    odd = Evaluator(C)
    odd.update(np.asfortranarray(np.moveaxis(P[0], -1, 0)), y[0], stems="000000000")
    single = Evaluator(C)
    single.update(np.moveaxis(P[0], -1, 0).copy(), y[0])
    assert same(odd.compute(), single.compute())


def test_public_api_is_sorted_and_every_name_resolves():
    assert klseg_cli.__all__ == sorted(klseg_cli.__all__)
    for name in klseg_cli.__all__:
        assert getattr(klseg_cli, name) is not None, name
    assert klseg_cli.compare is klseg_cli.compare_models


def test_evaluate_report_is_what_the_command_writes(tmp_path):
    """klseg_cli.evaluate_report with the command's keywords writes the report folder, gate
    files and all, that ``klseg evaluate`` writes, byte for byte."""
    args = [str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth")]
    gate = ["miou_pooled >= 0.85", "kl_pooled <= 0.01"]
    options = ["--classes", str(SAMPLE / "classes.txt"), "--out", str(tmp_path / "cli")]
    options += ["--require", gate[0], "--require", gate[1], "--junit", str(tmp_path / "cli.xml")]
    cli = CliRunner().invoke(app, ["evaluate", *args, *options])
    assert cli.exit_code == 1  # the second requirement fails
    done = klseg_cli.evaluate_report(
        *args, classes=str(SAMPLE / "classes.txt"), out=tmp_path / "api", require=gate,
        junit=tmp_path / "api.xml",
    )  # fmt: skip
    assert [r["passed"] for r in done.summary["requirements"]] == [True, False]
    assert done.gate_written and done.note is None
    for name in ("summary.json", "per_image.csv", "per_class.csv", "confusion.csv"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    assert (tmp_path / "api.xml").read_bytes() == (tmp_path / "cli.xml").read_bytes()
    with pytest.raises(UsageError, match="--heatmaps needs --out"):
        klseg_cli.evaluate_report(*args, heatmaps=2)


def test_heatmap_api_takes_the_command_keywords(tmp_path):
    pred, gt = SAMPLE / "predictions", SAMPLE / "ground_truth"
    stem = sorted(p.stem for p in pred.iterdir())[0]
    one = next(pred.glob(f"{stem}.*"))
    target = next(gt.glob(f"{stem}.*"))
    options = ["-o", str(tmp_path / "cli.png"), "--metric", "js", "--colorbar"]
    options += ["--classes", str(SAMPLE / "classes.txt")]
    cli = CliRunner().invoke(app, ["heatmap", str(one), str(target), *options])
    assert cli.exit_code == 0, cli.output
    written = klseg_cli.heatmap(one, target, tmp_path / "api.png", metric="js", colorbar=True,
                                classes=str(SAMPLE / "classes.txt"))  # fmt: skip
    assert written == [tmp_path / "api.png"]
    assert (tmp_path / "api.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
    with pytest.raises(UsageError, match="--against compares two predictions"):
        klseg_cli.heatmap(one, target, tmp_path / "x.png", against=one)
