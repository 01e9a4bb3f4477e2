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
from klseg_cli.readers import open_prediction, read_target

from .conftest import random_probs

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
