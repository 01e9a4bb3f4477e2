"""``--timeout`` and ``--strict-zarr`` on the commands that read inputs (P17)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app

from ..commands.test_api import SAMPLE
from ..io.faulty_http import FaultyServer

CLASSES = str(SAMPLE / "classes.txt")
PRED = str(SAMPLE / "predictions" / "scene_00.npy")
READING = ("evaluate", "heatmap", "calibrate", "compare", "info")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("command", READING)
def test_every_reading_command_has_the_flags(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "--timeout" in result.stdout and "--strict-zarr" in result.stdout


def test_timeout_flag_bounds_a_stalled_server(monkeypatch):
    pytest.importorskip("aiohttp")
    monkeypatch.setenv("KLSEG_TIMEOUT", "600")  # the flag wins over the environment
    files = {"/p.npy": (SAMPLE / "predictions" / "scene_00.npy").read_bytes()}
    with FaultyServer(files, "stall") as server:
        t0 = time.monotonic()
        result = invoke("evaluate", f"{server.url}/p.npy", str(SAMPLE / "ground_truth" /
                        "scene_00.png"), "--classes", CLASSES, "--timeout", "0.5")  # fmt: skip
        seconds = time.monotonic() - t0
        info = invoke("info", f"{server.url}/p.npy", "--timeout", "0.5")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {server.url}/p.npy: timed out: no data from the server for 0.5 s (--timeout "
        "or KLSEG_TIMEOUT gives a slow store longer)\n"
    )
    assert seconds < 5
    assert info.exit_code == 2 and "timed out: no data from the server" in info.stderr


@pytest.mark.parametrize("value", ["0", "-3", "inf"])
def test_timeout_must_be_positive(value):
    result = invoke("evaluate", PRED, str(SAMPLE / "ground_truth" / "scene_00.png"),
                    "--timeout", value)  # fmt: skip
    assert result.exit_code == 2
    assert "--timeout must be a positive number of seconds" in result.stderr


def test_strict_zarr_on_every_command(tmp_path):
    zarr = pytest.importorskip("zarr")
    from PIL import Image

    labels = np.asarray(Image.open(SAMPLE / "ground_truth" / "scene_00.png")).copy()
    labels[labels == 0] = 1  # every chunk differs from the fill value: all are stored
    store = tmp_path / "gt.zarr"
    z = zarr.create_array(str(store), shape=labels.shape, chunks=(40, 40), dtype=labels.dtype)
    z[:] = labels
    (store / "c" / "0" / "0").unlink()
    error = (
        f"Error: {store}: chunk c/0/0 is missing (--strict-zarr: a sparse or damaged store is "
        "an error; without it, missing chunks read as the fill value)\n"
    )
    warning = (
        f"warning: {store}: 1 Zarr chunk missing, read as the fill value 0 (a sparse array, or "
        "lost chunks? --strict-zarr makes this an error)\n"
    )
    runs = {
        "evaluate": ("evaluate", PRED, str(store), "--classes", CLASSES, "--format", "json"),
        "heatmap": ("heatmap", PRED, str(store), "-o", str(tmp_path / "h.png")),
        "calibrate": ("calibrate", PRED, str(store)),
        "compare": ("compare", PRED, PRED, str(store), "--format", "json"),
        "info": ("info", str(store)),
    }
    for command, args in runs.items():
        strict = invoke(*args, "--strict-zarr")
        assert strict.exit_code == 2, (command, strict.output)
        assert strict.stderr == error, command
        if command in ("evaluate", "heatmap", "info"):  # counted and warned where read
            lenient = invoke(*args)
            assert lenient.exit_code == 0, (command, lenient.output)
            assert lenient.stderr.startswith(warning), command  # heatmap: then "wrote ..."


@pytest.mark.parametrize(
    "args",
    [
        ("heatmap", "https://127.0.0.1:9/pred/", str(SAMPLE / "ground_truth"), "-o", "x.png"),
        ("compare", "s3://bucket/a", str(SAMPLE / "predictions")),
        ("compare", PRED, PRED, "gs://bucket/gt"),
        ("calibrate", str(SAMPLE / "predictions"), "s3://bucket/gt"),
        ("gate", "http://127.0.0.1:9/report/summary.json", "--require", "miou_pooled > 0.9"),
        (
            "evaluate",
            PRED,
            str(SAMPLE / "ground_truth" / "scene_00.png"),
            "--baseline",
            "https://127.0.0.1:9/summary.json",
        ),
        ("evaluate", PRED, "--rater", "s3://b/r1", "--rater", str(SAMPLE / "raters" / "rater_a")),
        (
            "heatmap",
            PRED,
            "--rater",
            str(SAMPLE / "raters" / "rater_a"),
            "--rater",
            "s3://b/r2",
            "--metric",
            "rater-disagreement",
            "-o",
            "x.png",
        ),
    ],
    ids=[
        "heatmap-pred",
        "compare-a",
        "compare-gt",
        "calibrate-gt",
        "gate",
        "baseline",
        "rater",
        "heatmap-rater",
    ],
)
def test_commands_of_local_files_refuse_a_url_in_one_line(args, tmp_path, monkeypatch):
    """heatmap, compare and calibrate read local files: a URL is named as typed (not as the
    path 'https:/host/...' that Path() makes of it), exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "are read as PRED and GT of klseg evaluate" in line
    url = next(a for a in args if "://" in a)
    assert url.rstrip("/") in line
    assert not any(tmp_path.iterdir())
