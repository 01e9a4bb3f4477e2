"""Round trips for every format, layout and dtype; layout detection; label checks."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from klseg_cli.core.labels import LabelSpec
from klseg_cli.errors import LabelError, ReadError, ShapeError
from klseg_cli.io.readers import (
    detect_layout,
    open_prediction,
    read_target,
)

from ..conftest import random_probs

H, W, C = 12, 17, 4


def chw_probs(rng, dtype):
    return (
        random_probs(rng, H * W, C, dtype=np.float64)
        .reshape(H, W, C)
        .transpose(2, 0, 1)
        .astype(dtype)
    )


def write_pred(path, arr, fmt):
    if fmt == "npy":
        np.save(path, arr)
    elif fmt == "npz":
        np.savez_compressed(path, probs=arr)
    elif fmt == "tif":
        tifffile.imwrite(path, arr, photometric="minisblack")
    elif fmt == "tifz":
        tifffile.imwrite(path, arr, photometric="minisblack", compression="zlib", tile=(16, 16))


@pytest.mark.parametrize("fmt", ["npy", "npz", "tif", "tifz"])
@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_prediction_round_trip(tmp_path, rng, fmt, layout, dtype):
    chw = chw_probs(rng, dtype)
    stored = chw if layout == "chw" else np.ascontiguousarray(chw.transpose(1, 2, 0))
    if fmt == "tifz" and layout == "hwc":
        stored = np.ascontiguousarray(stored)
    path = tmp_path / f"p.{'tif' if fmt.startswith('tif') else fmt}"
    write_pred(path, stored, fmt)
    pm = open_prediction(path, hw=(H, W))
    assert pm.layout == layout
    assert (pm.height, pm.width, pm.num_classes) == (H, W, C)
    block = pm.block(5, 40)
    expected = chw.reshape(C, -1)[:, 5:40].astype(np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_array_equal(block, expected)
    assert block.dtype == (np.float64 if dtype == np.float64 else np.float32)
    if fmt == "npy" or fmt == "tif":
        assert isinstance(pm.array, np.memmap)  # never fully loaded


def test_binary_map_is_p_of_class_one(tmp_path, rng):
    p1 = rng.random((H, W)).astype(np.float32)
    np.save(tmp_path / "b.npy", p1)
    pm = open_prediction(tmp_path / "b.npy", hw=(H, W))
    assert pm.layout == "hw" and pm.num_classes == 2
    block = pm.block(0, H * W)
    np.testing.assert_allclose(block[1], p1.reshape(-1))
    np.testing.assert_allclose(block[0], 1 - p1.reshape(-1))


def test_layout_detection():
    assert detect_layout((10, 20, 3), (10, 20)) == "hwc"
    assert detect_layout((3, 10, 20), (10, 20)) == "chw"
    assert detect_layout((5, 5, 5), (5, 5), layout="chw") == "chw"
    with pytest.raises(ShapeError, match=r"ambiguous.*--layout"):
        detect_layout((5, 5, 5), (5, 5))
    with pytest.raises(ShapeError, match="does not match target"):
        detect_layout((4, 10, 21), (10, 20))
    with pytest.raises(ShapeError, match="4 dimensions"):
        detect_layout((1, 3, 10, 20), (10, 20))


@pytest.mark.parametrize("kind", ["L", "P", "I;16", "npy", "tif", "bool"])
def test_target_round_trip(tmp_path, rng, kind):
    labels = rng.integers(0, 5, size=(H, W)).astype(np.uint8)
    labels[0, :3] = 255
    if kind == "L":
        Image.fromarray(labels, mode="L").save(tmp_path / "t.png")
        path = tmp_path / "t.png"
    elif kind == "P":
        img = Image.fromarray(labels, mode="P")
        img.putpalette([(i * 37) % 256 for i in range(768)])  # colours have nothing to do with ids
        img.save(tmp_path / "t.png")
        path = tmp_path / "t.png"
    elif kind == "I;16":
        Image.fromarray(labels.astype(np.uint16) * 300).save(tmp_path / "t.png")
        path = tmp_path / "t.png"
        labels = labels.astype(np.uint16) * 300
    elif kind == "npy":
        np.save(tmp_path / "t.npy", labels.astype(np.int64))
        path = tmp_path / "t.npy"
    elif kind == "bool":
        labels = (labels > 2).astype(np.uint8)
        np.save(tmp_path / "t.npy", labels.astype(bool))
        path = tmp_path / "t.npy"
    else:
        tifffile.imwrite(tmp_path / "t.tif", labels.astype(np.uint16))
        path = tmp_path / "t.tif"
    np.testing.assert_array_equal(read_target(path), labels)


def test_rgb_mask_is_refused(tmp_path):
    Image.new("RGB", (W, H), (128, 64, 128)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelError, match="colour"):
        read_target(tmp_path / "rgb.png")


def test_float_mask_needs_soft_gt(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((H, W), np.float32))
    with pytest.raises(LabelError, match="--soft-gt"):
        read_target(tmp_path / "f.npy")


def test_unknown_labels_are_named_with_counts(tmp_path):
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 7
    labels[1, :2] = 9
    labels[2, 0] = 255
    with pytest.raises(LabelError, match=r"7 \(1 px\), 9 \(2 px\)") as info:
        LabelSpec(5, (255,)).check(labels.reshape(-1), "gt/x.png")
    assert str(info.value).startswith("gt/x.png: ")
    spec = LabelSpec(5, (255,))
    spec.check(np.array([0, 4, 255]), "x")  # no error
    assert (spec.codes(np.array([0, 4, 255])) >= 0).tolist() == [True, True, False]
    codes = LabelSpec(5, (-1,)).codes(np.array([0, -1, 4], dtype=np.int16))
    assert (codes >= 0).tolist() == [True, False, True]
    unsigned = np.array([0, 4, 5, 255], dtype=np.uint8)  # C itself is not a class
    assert (spec.codes(unsigned) >= 0).tolist() == [True, True, False, False]
    with pytest.raises(LabelError, match=r"outside 0\.\.4 .*: 5 \(1 px\)"):
        spec.check(unsigned, "x")


@pytest.mark.parametrize("ignore", [(255,), (0, 255)])  # the plain and the mapped check
def test_unknown_label_counts_add_up_over_label_chunks(monkeypatch, ignore):
    """Labels are checked in chunks: a value's count is its total, not the last chunk's."""
    from klseg_cli.core import labels as labels_module

    monkeypatch.setattr(labels_module, "LABEL_CHUNK", 4)
    labels = np.zeros(20, np.uint8)
    labels[[1, 6, 7, 13]] = 9
    labels[18] = 8
    with pytest.raises(LabelError, match=r"8 \(1 px\), 9 \(4 px\)"):
        LabelSpec(5, ignore).check(labels, "x")


def test_object_npy_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ReadError, match="Python objects"):
        open_prediction(tmp_path / "o.npy", hw=(1, 1))


@pytest.mark.parametrize(
    "dtype,match", [(np.int32, "int32"), (np.complex64, "complex"), (bool, "bool")]
)
def test_non_float_predictions_are_refused(tmp_path, dtype, match):
    np.save(tmp_path / "x.npy", np.zeros((H, W, C), dtype=dtype))
    with pytest.raises(ReadError, match=match):
        open_prediction(tmp_path / "x.npy", hw=(H, W))


@pytest.mark.parametrize(
    "kind", ["chw_tiles", "hwc_tiles", "chw_strips", "hw_tiles", "hwc_as_pages"]
)
def test_tiled_and_stripped_tiffs_are_read_band_by_band(tmp_path, rng, kind):
    from klseg_cli.io.readers import TiffSegments

    h, w = 70, 90
    chw = random_probs(rng, h * w, C, dtype=np.float64).reshape(h, w, C).transpose(2, 0, 1)
    chw = np.ascontiguousarray(chw.astype(np.float32))
    path = tmp_path / "t.tif"
    if kind == "chw_tiles":
        tifffile.imwrite(
            path, chw, photometric="minisblack", tile=(32, 32), compression="zlib", bigtiff=True
        )
    elif kind == "hwc_tiles":
        tifffile.imwrite(
            path,
            np.ascontiguousarray(chw.transpose(1, 2, 0)),
            photometric="minisblack",
            planarconfig="contig",
            tile=(32, 32),
            compression="zlib",
        )
    elif kind == "chw_strips":
        tifffile.imwrite(path, chw, photometric="minisblack", compression="zlib", rowsperstrip=7)
    elif kind == "hw_tiles":
        tifffile.imwrite(path, chw[1], photometric="minisblack", compression="zlib", tile=(16, 48))
    else:  # tifffile stores (H, W, C) without planarconfig as H pages of (W, C)
        tifffile.imwrite(
            path,
            np.ascontiguousarray(chw.transpose(1, 2, 0)),
            photometric="minisblack",
            compression="zlib",
            tile=(16, 16),
        )
    pm = open_prediction(path, hw=(h, w))
    assert isinstance(pm.array, TiffSegments)  # every layout is read band by band
    for start, stop in ((0, 100), (95, 3000), (2000, 6300), (6250, 6300)):
        block = pm.block(start, stop)
        if kind == "hw_tiles":
            np.testing.assert_array_equal(block[1], chw[1].reshape(-1)[start:stop])
        else:
            np.testing.assert_array_equal(block, chw.reshape(C, -1)[:, start:stop])
    # at most one band of tile rows of each page and sample plane is held
    tiff = pm.array
    band_size = tiff.band_height * tiff.cols * (1 if tiff.separate else tiff.samples)
    assert all(band.size <= band_size for _, band in tiff._bands.values())
    assert len(tiff._bands) <= len(tiff.segments) * (tiff.samples if tiff.separate else 1)


def test_damaged_tiles_are_a_read_error(tmp_path, rng):
    chw = np.ascontiguousarray(random_probs(rng, 40 * 50, C).reshape(40, 50, C).transpose(2, 0, 1))
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, chw, photometric="minisblack", tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))
    pm = open_prediction(path, hw=(40, 50))
    with pytest.raises(ReadError, match="damaged TIFF tile"):
        for start in range(0, pm.n_pixels, 100):
            pm.block(start, min(start + 100, pm.n_pixels))
