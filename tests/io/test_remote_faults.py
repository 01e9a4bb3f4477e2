"""Remote inputs never hang and never flood memory (P17): faulty servers on 127.0.0.1.

The slow cases run ``klseg`` as a command (a subprocess) so that the exit code, the single
stderr line, the time to fail and the peak memory (RSS from /proc) are the user's; the
timeouts are small (``KLSEG_TIMEOUT``), so each test takes a few seconds.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app

from ..commands.test_api import SAMPLE, same
from .faulty_http import FaultyServer

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

CLASSES = str(SAMPLE / "classes.txt")
STARTUP = 6.0  # seconds a subprocess may spend importing klseg on a loaded 2-core machine


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _files(n: int = 2) -> dict[str, bytes]:
    """sample_data's first ``n`` .npy maps and their PNG targets, as server paths."""
    out = {}
    for path in sorted((SAMPLE / "predictions").glob("*.npy"))[:n]:
        out[f"/p/{path.name}"] = path.read_bytes()
        png = SAMPLE / "ground_truth" / f"{path.stem}.png"
        out[f"/g/{png.name}"] = png.read_bytes()
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def klseg(*args: str, env: dict | None = None, limit: float = 60.0):
    """Run ``klseg`` as a command: (exit code, stderr, seconds, peak RSS in bytes)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KLSEG_")}
    environ.update(env or {})
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "klseg_cli", *args], env=environ, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    peak = 0
    while proc.poll() is None and time.monotonic() - t0 < limit:
        peak = max(peak, _rss(proc.pid))
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    return proc.returncode, err, time.monotonic() - t0, peak


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_a_stalled_server_is_given_up_after_the_timeout():
    with FaultyServer(_files(1), "stall") as server:
        url = f"{server.url}/p/scene_00.npy"
        code, err, seconds, _ = klseg(
            "evaluate", url, f"{server.url}/g/scene_00.png", "--classes", CLASSES,
            env={"KLSEG_TIMEOUT": "1"},
        )  # fmt: skip
    assert code == 2
    assert one_line(err) == (
        f"Error: {url}: timed out: no data from the server for 1 s (--timeout or KLSEG_TIMEOUT "
        "gives a slow store longer)"
    )
    assert seconds < 1 + STARTUP


def test_a_trickling_server_is_given_up_at_the_deadline():
    """One byte a second never leaves the socket idle for the 1.5 s timeout: the deadline
    of the whole request (connect + timeout + bytes at 64 KiB/s, about 3 s) ends it. The
    map's header is asked first (its error waits while the target is read): the target
    is then not asked of the server that timed out, so the run fails after one deadline."""
    with FaultyServer(_files(1), "trickle", interval=1.0) as server:
        pred, target = f"{server.url}/p/scene_00.npy", f"{server.url}/g/scene_00.png"
        code, err, seconds, _ = klseg(
            "evaluate", pred, target, "--classes", CLASSES, env={"KLSEG_TIMEOUT": "1.5"}
        )  # fmt: skip
        gets = sum(server.gets.values())
    assert code == 2
    assert one_line(err) == (
        f"Error: {target}: not asked: its server timed out earlier in this run ({pred}: timed "
        "out: the server did not send the answer within 3.02 s (it stalls or sends slower "
        "than 64 KiB/s; --timeout or KLSEG_TIMEOUT gives a slow store longer))"
    )
    assert gets == 1
    assert seconds < 3.1 + STARTUP


def test_an_endless_index_page_is_bounded(tmp_path):
    with FaultyServer(_files(1), "endless-index") as server:
        code, err, seconds, peak = klseg(
            "evaluate", f"{server.url}/p/", f"{server.url}/g/", "--classes", CLASSES,
            env={"KLSEG_TIMEOUT": "5", "KLSEG_MAX_INDEX_BYTES": str(4 << 20)},
        )  # fmt: skip
        sent = server.sent
    assert code == 2
    assert one_line(err) == (
        f"Error: {server.url}/p: the index page is larger than 4,194,304 bytes; if the folder "
        "really lists that much, raise KLSEG_MAX_INDEX_BYTES"
    )
    assert peak < 400 << 20, peak  # an interpreter with NumPy and aiohttp: about 80 MiB
    assert sent < 64 << 20  # klseg stopped reading: the server could send no more
    assert seconds < 5 + STARTUP


def test_index_links_are_bounded_and_the_bound_can_be_raised(monkeypatch):
    files = _files(3)
    with FaultyServer(files, "ok") as server:
        args = ["evaluate", f"{server.url}/p/", f"{server.url}/g/", "--classes", CLASSES,
                "--format", "json", "--jobs", "1"]  # fmt: skip
        monkeypatch.setenv("KLSEG_MAX_INDEX_LINKS", "2")
        refused = CliRunner().invoke(app, args)
        monkeypatch.setenv("KLSEG_MAX_INDEX_LINKS", "3")
        ok = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert one_line(refused.stderr) == (
        f"Error: {server.url}/p: the index page lists 3 entries, more than 2; if that is "
        "right, raise KLSEG_MAX_INDEX_LINKS"
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["n_images"] == 3


def _local_numbers(n: int) -> dict:
    pairs = sorted((SAMPLE / "predictions").glob("*.npy"))[:n]
    result = CliRunner().invoke(app, ["evaluate", str(pairs[0]), str(
        SAMPLE / "ground_truth" / f"{pairs[0].stem}.png"), "--classes", CLASSES,
        "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["dataset"]


@pytest.mark.parametrize("mode", ["flaky", "reset"])
def test_transient_errors_are_retried(monkeypatch, mode):
    """A 503, or a range cut short by a reset, twice for every object: the third try of
    each request succeeds, and the numbers are those of the local files."""
    monkeypatch.setenv("KLSEG_RETRY_BACKOFF", "0.01")
    with FaultyServer(_files(1), mode, fail=2) as server:
        t0 = time.monotonic()
        result = CliRunner().invoke(app, [
            "evaluate", f"{server.url}/p/scene_00.npy", f"{server.url}/g/scene_00.png",
            "--classes", CLASSES, "--format", "json", "--chunk-pixels", "4096",
        ])  # fmt: skip
        seconds = time.monotonic() - t0
        gets = dict(server.gets)
    assert result.exit_code == 0, result.output
    assert same(json.loads(result.stdout)["dataset"], _local_numbers(1))
    assert gets["/p/scene_00.npy"] > 2 and gets["/g/scene_00.png"] > 2
    assert seconds < 10


@pytest.mark.parametrize("mode", ["flaky", "reset"])
def test_transient_errors_that_persist_are_one_line(monkeypatch, mode):
    monkeypatch.setenv("KLSEG_RETRY_BACKOFF", "0.01")
    monkeypatch.setenv("KLSEG_RETRIES", "2")
    with FaultyServer(_files(1), mode, fail=1000) as server:
        target = f"{server.url}/g/scene_00.png"
        result = CliRunner().invoke(app, [
            "evaluate", f"{server.url}/p/scene_00.npy", target, "--classes", CLASSES,
        ])  # fmt: skip
        gets = server.gets[target.split(server.url)[1]]
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith(f"Error: {target}: cannot read (") and line.endswith("(3 tries)")
    assert ("HTTP 503" in line) if mode == "flaky" else ("ClientPayloadError" in line)
    assert gets == 3


def test_a_server_ignoring_ranges_is_stopped_after_the_range():
    """A server that answers a range with the whole object: klseg reads one block past the
    range and stops (it used to read the whole body, however large, and then refuse it)."""
    from klseg_cli.errors import ReadError
    from klseg_cli.io.remote import RemotePath

    big = _npy(np.zeros((2048, 2048), dtype=np.float32))  # 16 MiB
    with FaultyServer({"/big.npy": big}, "no-ranges") as server:
        rp = RemotePath(f"{server.url}/big.npy")
        with pytest.raises(ReadError, match="it does not serve byte ranges"):
            rp.read_range(128, 256)


def test_settings_come_from_the_environment_and_the_timeout(monkeypatch):
    from klseg_cli.errors import UsageError
    from klseg_cli.io import network

    assert network.from_environment({}) == network.NetworkSettings()
    got = network.from_environment({"KLSEG_TIMEOUT": "2", "KLSEG_RETRIES": "0"})
    assert (got.timeout, got.connect, got.retries) == (2.0, 2.0, 0)
    assert network.from_environment({"KLSEG_CONNECT_TIMEOUT": "3"}).connect == 3.0
    assert network.NetworkSettings().with_timeout(120).connect == network.DEFAULT_CONNECT
    for bad in ({"KLSEG_TIMEOUT": "soon"}, {"KLSEG_TIMEOUT": "0"}, {"KLSEG_RETRIES": "-1"},
                {"KLSEG_MAX_INDEX_BYTES": "1.5"}, {"KLSEG_RETRY_BACKOFF": "nan"}):  # fmt: skip
        with pytest.raises(UsageError):
            network.from_environment(bad)
    with pytest.raises(UsageError, match="--timeout must be a positive number of seconds"):
        network.settings_for(-1)
    s = network.NetworkSettings(timeout=1, connect=1)
    assert s.deadline(64 << 10) == pytest.approx(3.0)


# --- Zarr ------------------------------------------------------------------------------


def _label_store(tmp_path: Path, name: str = "gt.zarr") -> tuple[Path, np.ndarray]:
    zarr = pytest.importorskip("zarr")
    from PIL import Image

    labels = np.asarray(Image.open(SAMPLE / "ground_truth" / "scene_00.png")).copy()
    labels[labels == 0] = 1  # no chunk equals the fill value: every chunk is stored
    store = tmp_path / name
    z = zarr.create_array(str(store), shape=labels.shape, chunks=(40, 40), dtype=labels.dtype,
                          fill_value=0)  # fmt: skip
    z[:] = labels
    return store, labels


def test_missing_zarr_chunks_are_counted_warned_and_recorded(tmp_path):
    store, _ = _label_store(tmp_path)
    pred = str(SAMPLE / "predictions" / "scene_00.npy")
    whole = CliRunner().invoke(app, ["evaluate", pred, str(store), "--classes", CLASSES,
                                     "--out", str(tmp_path / "whole")])  # fmt: skip
    assert whole.exit_code == 0, whole.output
    assert "warning" not in whole.stderr
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["zarr_missing_chunks"] == {"total": 0, "files": []}
    (store / "c" / "0" / "1").unlink()
    (store / "c" / "2" / "3").unlink()
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["evaluate", pred, str(store), "--classes", CLASSES,
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert one_line(result.stderr) == (
        f"warning: {store}: 2 Zarr chunks missing, read as the fill value 0 (a sparse array, "
        "or lost chunks? --strict-zarr makes this an error)"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zarr_missing_chunks"] == {
        "total": 2, "files": [{"file": str(store), "chunks": 2, "fill_value": 0}],
    }  # fmt: skip


def test_strict_zarr_refuses_a_missing_chunk(tmp_path):
    import klseg_cli
    from klseg_cli.errors import ReadError

    store, _ = _label_store(tmp_path)
    (store / "c" / "1" / "1").unlink()
    pred = str(SAMPLE / "predictions" / "scene_00.npy")
    with pytest.raises(ReadError) as caught:
        klseg_cli.evaluate(pred, str(store), classes=CLASSES, strict_zarr=True)
    assert str(caught.value) == (
        f"{store}: chunk c/1/1 is missing (--strict-zarr: a sparse or damaged store is an "
        "error; without it, missing chunks read as the fill value)"
    )
    with pytest.warns(UserWarning, match="1 Zarr chunk missing, read as the fill value 0"):
        result = klseg_cli.evaluate(pred, str(store), classes=CLASSES)
    assert result.summary()["zarr_missing_chunks"]["total"] == 1


def test_missing_chunks_of_a_map_are_counted(tmp_path):
    zarr = pytest.importorskip("zarr")
    import klseg_cli

    pred = np.load(SAMPLE / "predictions" / "scene_00.npy")  # (120, 160, 5)
    store = tmp_path / "p.zarr"
    z = zarr.create_array(str(store), shape=pred.shape, chunks=(40, 40, 5), dtype=pred.dtype,
                          fill_value=0.2)  # fmt: skip
    z[:] = pred
    (store / "c" / "2" / "0" / "0").unlink()
    gt = str(SAMPLE / "ground_truth" / "scene_00.png")
    with pytest.warns(UserWarning, match="p.zarr: 1 Zarr chunk missing, read as the fill value"):
        result = klseg_cli.evaluate(str(store), gt, classes=CLASSES, chunk_pixels=1000)
    files = result.summary()["zarr_missing_chunks"]["files"]
    assert files == [{"file": str(store), "chunks": 1, "fill_value": pytest.approx(0.2)}]


def test_a_chunk_linked_outside_the_store_is_one_line(tmp_path):
    """zarr reads chunks concurrently; when one fails, the others were left pending on
    its event loop and destroyed at exit ("Task was destroyed but it is pending!")."""
    store, _ = _label_store(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not a chunk" * 10)
    chunk = store / "c" / "0" / "0"
    chunk.unlink()
    chunk.symlink_to(outside)
    code, err, _, _ = klseg(
        "evaluate", str(SAMPLE / "predictions" / "scene_00.npy"), str(store),
        "--classes", CLASSES,
    )  # fmt: skip
    assert code == 2
    assert one_line(err).startswith(f"Error: {store}: cannot read Zarr chunks (")


def test_a_zarr_store_over_http_counts_missing_chunks_and_times_out(tmp_path, monkeypatch):
    """Over HTTP a missing chunk is a 404 (read as the fill value, counted), and a stalled
    store is given up after the timeout like any other remote read."""
    store, _ = _label_store(tmp_path)
    (store / "c" / "1" / "2").unlink()
    files = {
        f"/z/gt.zarr/{p.relative_to(store).as_posix()}": p.read_bytes()
        for p in store.rglob("*")
        if p.is_file()
    }
    pred = str(SAMPLE / "predictions" / "scene_00.npy")
    monkeypatch.setenv("KLSEG_TIMEOUT", "1")
    with FaultyServer(files, "ok") as server:
        url = f"{server.url}/z/gt.zarr"
        ok = CliRunner().invoke(app, ["evaluate", pred, url, "--classes", CLASSES,
                                      "--format", "json"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert one_line(ok.stderr).startswith(f"warning: {url}: 1 Zarr chunk missing")
    assert json.loads(ok.stdout)["zarr_missing_chunks"]["total"] == 1
    with FaultyServer(files, "stall-get") as server:
        url = f"{server.url}/z/gt.zarr"
        t0 = time.monotonic()
        stalled = CliRunner().invoke(app, ["evaluate", pred, url, "--classes", CLASSES])
        seconds = time.monotonic() - t0
    assert stalled.exit_code == 2
    assert one_line(stalled.stderr) == (
        f"Error: {url}: timed out: no data from the server for 1 s (--timeout or "
        "KLSEG_TIMEOUT gives a slow store longer)"
    )
    assert seconds < 5


def test_a_stalled_s3_endpoint_is_given_up(monkeypatch):
    """s3fs through botocore: its connect/read timeouts and retries are configured, and the
    request's deadline bounds them all."""
    pytest.importorskip("s3fs")
    import fsspec.config

    from klseg_cli.io.remote import reset_filesystems

    monkeypatch.setenv("KLSEG_TIMEOUT", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with FaultyServer({}, "stall") as server:
        conf = {"endpoint_url": server.url, "key": "k", "secret": "s"}
        monkeypatch.setitem(fsspec.config.conf, "s3", conf)
        reset_filesystems()
        try:
            t0 = time.monotonic()
            result = CliRunner().invoke(app, ["evaluate", "s3://b/p/a.npy", "s3://b/g/a.png",
                                              "--classes", CLASSES])  # fmt: skip
            seconds = time.monotonic() - t0
        finally:
            reset_filesystems()
    assert result.exit_code == 2, result.output
    assert one_line(result.stderr).startswith("Error: s3://b/p/a.npy: timed out: ")
    assert seconds < 10


def _file_gets(server: FaultyServer) -> int:
    return sum(n for path, n in server.gets.items() if not path.endswith("/"))


def test_a_server_that_timed_out_is_asked_once_per_run(monkeypatch):
    """Three maps on a stalled server: one timeout, not three (the others are "not asked"
    in that run); the next run asks it again. (The first map's own error is the timeout
    quoted: its header was first read, and its error held, while the run was planned.)"""
    monkeypatch.setenv("KLSEG_TIMEOUT", "0.5")
    files = _files(3)
    with FaultyServer(files, "stall-get") as server:
        args = ["evaluate", f"{server.url}/p/", str(SAMPLE / "ground_truth"), "--classes",
                CLASSES, "--keep-going", "--allow-missing", "--format", "json",
                "--jobs", "1"]  # fmt: skip
        t0 = time.monotonic()
        first = CliRunner().invoke(app, args)
        seconds = time.monotonic() - t0
        gets_first = _file_gets(server)
        second = CliRunner().invoke(app, args)
        gets_second = _file_gets(server) - gets_first
    assert first.exit_code == 2
    *lines, last = first.stderr.strip().splitlines()  # --keep-going: each pair's error
    assert len(lines) == 3 and last == "Error: no pair could be evaluated; no report was written"
    assert all(": not asked: its server timed out earlier in this run (" in ln for ln in lines)
    assert lines[0].endswith(": timed out: no data from the server for 0.5 s (--timeout or "
                             "KLSEG_TIMEOUT gives a slow store longer))")  # fmt: skip
    assert (gets_first, gets_second) == (1, 1)
    assert seconds < 4
    assert second.exit_code == 2
