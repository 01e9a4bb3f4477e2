"""Fuzz the readers: truncated and byte-flipped files raise KlsegError, never anything else."""

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from klseg_cli.errors import KlsegError
from klseg_cli.io.readers import PredictionMap, open_prediction, read_target

from ..conftest import random_probs

H, W, C = 9, 11, 3


def _pred():
    return random_probs(np.random.default_rng(7), H * W, C).reshape(H, W, C)


def _npy():
    buf = io.BytesIO()
    np.save(buf, _pred())
    return buf.getvalue()


def _npz():
    buf = io.BytesIO()
    np.savez_compressed(buf, probs=_pred())
    return buf.getvalue()


def _tif(**kw):
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, np.ascontiguousarray(_pred().transpose(2, 0, 1)), photometric="minisblack", **kw
    )
    return buf.getvalue()


def _png(mode):
    labels = (np.arange(H * W) % C).reshape(H, W).astype(np.uint8)
    img = Image.fromarray(labels, mode="L")
    if mode == "P":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


VALID = {
    "npy": (".npy", _npy()),
    "npz": (".npz", _npz()),
    "tif": (".tif", _tif()),
    "tifz": (".tif", _tif(compression="zlib")),
    "png_L": (".png", _png("L")),
    "png_P": (".png", _png("P")),
}


def damage(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data if cut is None else data[: cut % (len(data) + 1)])
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


def read_fully(path: Path) -> None:
    if path.suffix == ".png":
        read_target(path)
        return
    pm = open_prediction(path, hw=None, num_classes=C)
    for start in range(0, pm.n_pixels, 17):
        pm.block(start, min(start + 17, pm.n_pixels))


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_files_read(kind, tmp_path):
    suffix, data = VALID[kind]
    (tmp_path / f"x{suffix}").write_bytes(data)
    read_fully(tmp_path / f"x{suffix}")


@pytest.mark.parametrize("kind", sorted(VALID))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
)
def test_damaged_files_raise_only_klseg_errors(kind, cut, flips):
    suffix, data = VALID[kind]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(damage(data, cut, flips))
        try:
            read_fully(path)
        except KlsegError:
            pass


# --- TIFF geometries: every shape with a 1 on some axis, compression, planar configuration ---

TIFF_SHAPES = [(1, 64, 5), (64, 1, 5), (1, 1, 5), (7, 9, 3), (7, 9, 4), (3, 1, 2), (1, 8, 2)]


def _write_tiff(path, arr, compression, planar, tile):
    kw = {"photometric": "minisblack", "compression": compression}
    if planar is not None:
        kw["planarconfig"] = planar
    if tile:
        kw["tile"] = (16, 16)
    else:
        kw["rowsperstrip"] = 3
    tifffile.imwrite(path, arr, **kw)


@pytest.mark.parametrize("shape", TIFF_SHAPES)
@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("compression", [None, "zlib", "lzma"])
@pytest.mark.parametrize("planar", [None, "contig", "separate"])
@pytest.mark.parametrize("tile", [False, True])
def test_tiff_geometries_read_exactly(tmp_path, shape, layout, compression, planar, tile):
    """Regression (#10): a zlib HWC TIFF with H = 1 was read as "1 classes" (NumPy path),
    crashed (kernel) or gave n_valid = 0 and success. Every geometry tifffile writes must
    read back value for value, or be refused with a clear error — never misread."""
    from klseg_cli.core.metrics import MetricSettings
    from klseg_cli.engine.image import image_stats

    h, w, c = shape
    hwc = random_probs(np.random.default_rng(3), h * w, c).reshape(h, w, c)
    arr = hwc if layout == "hwc" else np.ascontiguousarray(hwc.transpose(2, 0, 1))
    path = tmp_path / "p.tif"
    try:
        _write_tiff(path, arr, compression, planar, tile)
    except (ValueError, KeyError):
        pytest.skip("tifffile cannot write this combination")
    labels = np.random.default_rng(4).integers(0, c, size=(h, w)).astype(np.uint8)
    try:
        pm = open_prediction(path, hw=(h, w), layout=layout if h == w == c else None)
    except KlsegError as err:  # an ambiguous layout is a clear refusal, not a misread
        assert "ambiguous" in str(err) or "layout" in str(err), err
        return
    assert (pm.height, pm.width, pm.num_classes) == (h, w, c)
    np.testing.assert_array_equal(pm.block(0, h * w), hwc.reshape(-1, c).T)
    settings = MetricSettings(num_classes=c)
    expected = image_stats(PredictionMap("mem", arr, layout), labels, settings, chunk_pixels=5)
    for accelerate in (False, True):
        got = image_stats(pm, labels, settings, chunk_pixels=5, accelerate=accelerate)
        assert got.n_valid == h * w
        np.testing.assert_array_equal(got.confusion, expected.confusion)
        np.testing.assert_allclose(got.sums, expected.sums, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("tile", [False, True])
def test_compressed_and_tiled_label_tiffs(tmp_path, compression, tile):
    labels = np.random.default_rng(5).integers(0, 5, size=(33, 40)).astype(np.uint8)
    path = tmp_path / "y.tif"
    _write_tiff(path, labels, compression, None, tile)
    np.testing.assert_array_equal(read_target(path), labels)
