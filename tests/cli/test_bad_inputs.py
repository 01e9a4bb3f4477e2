"""Every bad input: exit 2, one stderr line naming the file, nothing written (DESIGN §4)."""

import json
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from klseg_cli.cli.root import app

from ..conftest import random_probs

runner = CliRunner()
H, W, C = 6, 8, 3


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    return tmp_path / "pred", tmp_path / "gt", tmp_path / "out"


def good_pred(rng=None, h=H, w=W, c=C):
    rng = rng or np.random.default_rng(0)
    return random_probs(rng, h * w, c).reshape(h, w, c)


def good_mask(h=H, w=W, c=C):
    return (np.arange(h * w) % c).reshape(h, w).astype(np.uint8)


def save_pair(pred_dir, gt_dir, stem="a", pred=None, mask=None):
    np.save(pred_dir / f"{stem}.npy", good_pred() if pred is None else pred)
    Image.fromarray(good_mask() if mask is None else mask, mode="L").save(gt_dir / f"{stem}.png")


def evaluate(pred_dir, gt_dir, out, *extra):
    return runner.invoke(
        app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out), *map(str, extra)]
    )


def assert_refused(result, out, *needles):
    """Exit 2, exactly one line on stderr naming the file and the problem, nothing written."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert not out.exists(), list(out.iterdir())


# --- folders and pairing ------------------------------------------------------------------


def test_empty_prediction_folder(dirs):
    pred, gt, out = dirs
    Image.fromarray(good_mask(), mode="L").save(gt / "a.png")
    assert_refused(evaluate(pred, gt, out), out, pred, "no prediction files")


def test_empty_target_folder(dirs):
    pred, gt, out = dirs
    np.save(pred / "a.npy", good_pred())
    assert_refused(evaluate(pred, gt, out), out, gt, "no target files")


def test_target_without_prediction(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    Image.fromarray(good_mask(), mode="L").save(gt / "b.png")
    assert_refused(evaluate(pred, gt, out), out, "b.png", "--allow-missing")
    ok = evaluate(pred, gt, out, "--allow-missing")
    assert ok.exit_code == 0 and "b.png" in ok.stderr
    assert json.loads((out / "summary.json").read_text())["missing_predictions"][0].endswith(
        "b.png"
    )


def test_two_predictions_with_the_same_stem(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    tifffile.imwrite(pred / "a.tif", good_pred(), photometric="minisblack")
    assert_refused(evaluate(pred, gt, out), out, pred, "a.npy and a.tif")


# --- files that are not what they say -----------------------------------------------------


def test_png_that_is_text(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    (gt / "a.png").write_text("not an image\n")
    assert_refused(evaluate(pred, gt, out), out, gt / "a.png", "cannot read as PNG")


def test_npy_that_is_a_png(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    (pred / "a.npy").write_bytes((gt / "a.png").read_bytes())
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", "not a valid .npy")


@pytest.mark.parametrize("which", ["npy", "png", "tif"])
def test_zero_byte_files(dirs, which):
    pred, gt, out = dirs
    save_pair(pred, gt)
    if which == "tif":
        (pred / "a.npy").unlink()
        (pred / "a.tif").write_bytes(b"")
        path = pred / "a.tif"
    else:
        path = pred / "a.npy" if which == "npy" else gt / "a.png"
        path.write_bytes(b"")
    assert_refused(evaluate(pred, gt, out), out, path)


@pytest.mark.parametrize("which", ["npy", "tif", "tifz", "png"])
def test_truncated_files(dirs, which):
    pred, gt, out = dirs
    save_pair(pred, gt, pred=good_pred(h=40, w=50), mask=good_mask(h=40, w=50))
    if which.startswith("tif"):
        (pred / "a.npy").unlink()
        kw = {"compression": "zlib"} if which == "tifz" else {}
        tifffile.imwrite(pred / "a.tif", good_pred(h=40, w=50), photometric="minisblack", **kw)
        path = pred / "a.tif"
    else:
        path = pred / "a.npy" if which == "npy" else gt / "a.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert_refused(evaluate(pred, gt, out), out, path)


def test_unreadable_file(dirs, monkeypatch):
    pred, gt, out = dirs
    save_pair(pred, gt)
    import builtins

    real_open = builtins.open

    def no_access(file, *args, **kwargs):
        if str(file) == str(pred / "a.npy"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_access)
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", "Permission denied")


# --- contents that are not probabilities --------------------------------------------------


def test_object_npy_is_refused_without_unpickling(dirs, monkeypatch):
    pred, gt, out = dirs
    save_pair(pred, gt)
    np.save(pred / "a.npy", np.array([[{"x": 1}]], dtype=object), allow_pickle=True)
    import pickle

    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", "Python objects")


@pytest.mark.parametrize(
    "array,needle",
    [
        (np.zeros((H, W, C), dtype=[("a", "f4")]), "structured"),
        (np.zeros((H, W, C), dtype=np.int64), "int64"),
        (np.zeros((H, W, C), dtype=bool), "bool"),
        (np.zeros((H, W, C), dtype=np.complex64), "complex"),
    ],
)
def test_arrays_that_are_not_float(dirs, array, needle):
    pred, gt, out = dirs
    save_pair(pred, gt, pred=array)
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", needle)


@pytest.mark.parametrize(
    "value,needles",
    [
        (np.nan, ["NaN"]),
        (np.inf, ["NaN or infinite"]),
        (-0.2, ["[-0.2", "--input logits"]),
        (1.7, ["1.7", "--input logits"]),
    ],
)
def test_bad_probability_values(dirs, value, needles):
    pred, gt, out = dirs
    p = good_pred()
    p[2, 3, 1] = value
    save_pair(pred, gt, pred=p)
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", *needles)


def test_rows_not_summing_to_one_suggest_renormalize(dirs):
    pred, gt, out = dirs
    p = good_pred()
    p[0, 0] *= 0.5  # pixels that sum to different values
    save_pair(pred, gt, pred=p)
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", "do not sum to 1", "--renormalize")
    assert evaluate(pred, gt, out, "--renormalize").exit_code == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["renormalize"] is True


@pytest.mark.parametrize("scale", [0.9, 1.05, 100.0])
def test_scaled_probabilities_are_not_called_logits(dirs, scale):
    """Regression (#10): maps whose pixels all sum to the same k ≠ 1 (×1.05, percentages)
    were diagnosed as logits; they are scaled probabilities: --renormalize."""
    pred, gt, out = dirs
    save_pair(pred, gt, pred=good_pred() * scale)
    result = evaluate(pred, gt, out)
    assert_refused(result, out, pred / "a.npy", "scaled probabilities", "--renormalize")
    assert "logits" not in result.stderr
    assert evaluate(pred, gt, out, "--renormalize").exit_code == 0


# --- shapes and layouts -------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,needles",
    [
        ((H + 1, W, C), ["(7, 8, 3)", "(6, 8)"]),
        ((C, H, W + 2), ["(3, 6, 10)"]),
        ((2, H, W, C), ["4 dimensions"]),
    ],
)
def test_shape_problems(dirs, shape, needles):
    pred, gt, out = dirs
    save_pair(pred, gt, pred=np.full(shape, 1.0 / C, np.float32))
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", *needles)


def test_ambiguous_layout(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt, pred=np.full((4, 4, 4), 0.25, np.float32), mask=good_mask(4, 4, 4))
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", "--layout")


@pytest.mark.parametrize("classes", ["a,b", "a,b,c,d"])
def test_class_count_differs_from_classes(dirs, classes):
    pred, gt, out = dirs
    save_pair(pred, gt)
    n = len(classes.split(","))
    assert_refused(
        evaluate(pred, gt, out, "--classes", classes),
        out,
        pred / "a.npy",
        "3 classes",
        f"expected {n}",
    )


# --- targets ------------------------------------------------------------------------------


def test_labels_outside_the_classes(dirs):
    pred, gt, out = dirs
    mask = good_mask()
    mask[0, :3] = 9
    mask[1, 0] = 200
    save_pair(pred, gt, mask=mask)
    assert_refused(evaluate(pred, gt, out), out, gt / "a.png", "9 (3 px)", "200 (1 px)")


def test_rgb_mask(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    Image.new("RGB", (W, H), (128, 64, 128)).save(gt / "a.png")
    assert_refused(evaluate(pred, gt, out), out, gt / "a.png", "colour", "palette")


def test_float_mask_without_soft_gt(dirs):
    pred, gt, out = dirs
    np.save(pred / "a.npy", good_pred())
    np.save(gt / "a.npy", good_mask().astype(np.float32))
    assert_refused(evaluate(pred, gt, out), out, gt / "a.npy", "--soft-gt")


def test_soft_target_rows_not_summing_to_one(dirs):
    pred, gt, out = dirs
    np.save(pred / "a.npy", good_pred())
    np.save(gt / "a.npy", good_pred(np.random.default_rng(5)) * 0.5)
    assert_refused(evaluate(pred, gt, out, "--soft-gt"), out, gt / "a.npy", "do not sum to 1")


# --- absurd sizes -------------------------------------------------------------------------


def png_claiming(path, width, height):
    """A tiny PNG whose header claims a huge size (a decompression bomb's calling card)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def tiff_claiming(path, width, height, samples):
    """A tiny TIFF whose header claims width × height × samples float32 values."""
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 32),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, samples),
        (278, 4, 1, height),
        (279, 4, 1, 16),
        (284, 3, 1, 1),
        (339, 3, 1, 3),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HHI", tag, typ, count)
        packed += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += packed
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 24) + b"\0" * 16 + ifd)


def test_png_bomb_is_refused_before_decoding(dirs):
    pred, gt, out = dirs
    np.save(pred / "a.npy", good_pred())
    png_claiming(gt / "a.png", 100_000, 100_000)
    assert_refused(evaluate(pred, gt, out), out, gt / "a.png", "--max-pixels")


def test_tiff_bomb_is_refused_before_allocating(dirs):
    pred, gt, out = dirs
    Image.fromarray(good_mask(), mode="L").save(gt / "a.png")
    tiff_claiming(pred / "a.tif", 100_000, 100_000, 1000)
    assert_refused(evaluate(pred, gt, out), out, pred / "a.tif", "--max-pixels")


def test_npy_header_claiming_more_than_the_file_holds(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    header = pred / "big.npy"
    with open(header, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (H, W, 100_000)}
        )
    header.rename(pred / "a.npy")
    assert_refused(evaluate(pred, gt, out), out, pred / "a.npy", "truncated")


def test_max_pixels_override(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    assert_refused(evaluate(pred, gt, out, "--max-pixels", 10), out, "--max-pixels")
    assert evaluate(pred, gt, out, "--max-pixels", 48).exit_code == 0


# --- outputs ------------------------------------------------------------------------------


def test_out_is_an_existing_file(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    out.write_text("precious")
    result = evaluate(pred, gt, out)
    assert result.exit_code == 2 and "existing file" in result.stderr
    assert out.read_text() == "precious"


def test_output_that_would_overwrite_an_input(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt)
    before = (pred / "a.npy").read_bytes()
    result = evaluate(pred, gt, out, "--require", "miou_pooled >= 0", "--junit", pred / "a.npy")
    assert_refused(result, out, pred / "a.npy", "input")
    assert (pred / "a.npy").read_bytes() == before
    hm = runner.invoke(
        app, ["heatmap", str(pred / "a.npy"), str(gt / "a.png"), "-o", str(gt / "a.png")]
    )
    assert hm.exit_code == 2 and "is an input" in hm.stderr


# --- keep going, interrupts, debug --------------------------------------------------------


def test_keep_going_reports_the_rest_and_still_exits_2(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt, "a")
    save_pair(pred, gt, "b")
    save_pair(pred, gt, "c")
    (pred / "b.npy").write_bytes(b"garbage")
    mask = good_mask()
    mask[0, 0] = 7
    Image.fromarray(mask, mode="L").save(gt / "c.png")
    result = evaluate(pred, gt, out, "--keep-going")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "b.npy" in lines[0] and "c.png" in lines[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 1 and [r["image"] for r in summary["images"]] == ["a"]
    assert [e["file"].rsplit("/", 1)[-1] for e in summary["errors"]] == ["b.npy", "c.png"]


def test_ctrl_c_leaves_no_report_and_exits_130(dirs, monkeypatch):
    pred, gt, out = dirs
    for stem in "abc":
        save_pair(pred, gt, stem)
    import klseg_cli.engine.local as ev

    real = ev.evaluate_pair
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_pair", interrupted)
    result = evaluate(pred, gt, out)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    assert not out.exists()


def test_debug_shows_a_traceback(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt, pred=good_pred() * 3)
    result = evaluate(pred, gt, out, "--debug")
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "ProbabilityError"


def test_keep_going_when_the_first_file_is_bad(dirs):
    pred, gt, out = dirs
    save_pair(pred, gt, "a")
    save_pair(pred, gt, "b")
    (pred / "a.npy").write_bytes(b"garbage")
    result = evaluate(pred, gt, out, "--keep-going")
    assert result.exit_code == 2 and "a.npy" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["image"] for r in summary["images"]] == ["b"]
    assert_refused(evaluate(pred, gt, tmp := out.parent / "out2"), tmp, "a.npy")
