"""URLs (fsspec) against a real S3 API on localhost (moto's server), and Zarr stores."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from klseg_cli.cli.root import app

from ..commands.test_api import SAMPLE, same

pytest.importorskip("fsspec")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CLASSES = str(SAMPLE / "classes.txt")


def run(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args, "--classes", CLASSES, "--jobs", "1"])


def numbers(summary: dict) -> dict:
    return {k: summary[k] for k in ("dataset", "classes", "images", "n_valid", "n_images")}


@pytest.fixture(scope="module")
def local_summary(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("local") / "report"
    result = run(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"), "--out", str(out))
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free 127.0.0.1 port, a bucket of sample_data, a denied bucket;
    fsspec configured to reach it; stopped after the module."""
    import boto3
    import fsspec.config

    from klseg_cli.io.remote import reset_filesystems

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
    client.klseg_endpoint = endpoint  # for tests that configure a subprocess
    client.create_bucket(Bucket="klseg")
    for folder, prefix in (("predictions", "pred"), ("ground_truth", "gt")):
        for path in sorted((SAMPLE / folder).iterdir()):
            client.put_object(Bucket="klseg", Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    npy = (SAMPLE / "predictions" / "scene_00.npy").read_bytes()
    client.put_object(Bucket="klseg", Key="bad/scene_00.npy", Body=npy[: len(npy) // 2])
    client.create_bucket(Bucket="denied")
    client.put_object(Bucket="denied", Key="pred/scene_00.npy", Body=npy)
    deny = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": ["arn:aws:s3:::denied/*"]}],
    }  # fmt: skip
    client.put_bucket_policy(Bucket="denied", Policy=json.dumps(deny))
    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "test", "secret": "test"}
    reset_filesystems()
    try:
        yield client
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
        reset_filesystems()
        server.stop()


def test_s3_folders_give_the_local_numbers(s3, local_summary, tmp_path):
    out = tmp_path / "report"
    result = run("s3://klseg/pred/", "s3://klseg/gt", "--out", str(out))
    assert result.exit_code == 0, result.output
    got = json.loads((out / "summary.json").read_text())
    assert same(numbers(got), numbers(local_summary))


def test_s3_configured_by_environment_with_worker_processes(s3, local_summary, tmp_path):
    """The deployment path: `klseg` as a command, fsspec configured by environment
    variables (as on a cluster), --jobs 2 worker processes reading the bucket."""
    import os
    import subprocess

    env = dict(os.environ, FSSPEC_S3_ENDPOINT_URL=s3.klseg_endpoint, FSSPEC_S3_KEY="test",
               FSSPEC_S3_SECRET="test")  # fmt: skip
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "klseg_cli", "evaluate", "s3://klseg/pred", "s3://klseg/gt",
         "--classes", CLASSES, "--jobs", "2", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads((out / "summary.json").read_text())
    assert same(numbers(got), numbers(local_summary))


def test_s3_single_pair_and_errors(s3):
    gt = str(SAMPLE / "ground_truth" / "scene_00.png")
    ok = run("s3://klseg/pred/scene_00.npy", "s3://klseg/gt/scene_00.png", "--format", "json")
    assert ok.exit_code == 0, ok.output
    cases = {
        "s3://klseg/pred/nothing.npy": "s3://klseg/pred/nothing.npy: no such object",
        "s3://denied/pred/scene_00.npy": "s3://denied/pred/scene_00.npy: access denied",
        "s3://klseg/bad/scene_00.npy": "s3://klseg/bad/scene_00.npy: is truncated",
    }
    for url, message in cases.items():
        result = run(url, gt)
        assert result.exit_code == 2, (url, result.output)
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_remote_npy_is_read_by_ranges(monkeypatch, tmp_path):
    """A remote map is never downloaded whole: every request is at most one chunk."""
    import fsspec

    from klseg_cli.io.remote import RemotePath

    rng = np.random.default_rng(0)
    C, H, W = 3, 64, 50
    p = rng.dirichlet(np.ones(C), size=(H, W)).astype(np.float32)
    y = rng.integers(0, C, size=(H, W)).astype(np.uint8)
    fs = fsspec.filesystem("memory")
    for name, arr in (("p/a.npy", p), ("p/b.npy", np.ascontiguousarray(np.moveaxis(p, -1, 0)))):
        np.save(tmp_path / "x.npy", arr)
        fs.pipe(f"/klseg-test/{name}", (tmp_path / "x.npy").read_bytes())
    np.save(tmp_path / "y.npy", y)
    fs.pipe("/klseg-test/y/y.npy", (tmp_path / "y.npy").read_bytes())
    sizes = []
    real = RemotePath.read_range

    def spy(self, start, stop):
        sizes.append(stop - start)
        return real(self, start, stop)

    monkeypatch.setattr(RemotePath, "read_range", spy)
    local = CliRunner().invoke(app, ["evaluate", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                                     "--format", "json"])  # fmt: skip
    for name in ("a", "b"):
        sizes.clear()
        url = f"memory://klseg-test/p/{name}.npy"
        result = CliRunner().invoke(
            app, ["evaluate", url, "memory://klseg-test/y/y.npy", "--format", "json",
                  "--chunk-pixels", "512"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert max(sizes[1:]) <= 512 * C * 4 < p.nbytes
        if name == "b":  # the same array as x.npy
            assert same(json.loads(result.stdout)["dataset"], json.loads(local.stdout)["dataset"])


def test_url_without_the_extra_names_it(monkeypatch):
    from klseg_cli.io.remote import reset_filesystems

    reset_filesystems()
    monkeypatch.setitem(sys.modules, "fsspec", None)
    result = run("s3://klseg/pred/", "s3://klseg/gt/")
    assert result.exit_code == 2
    assert "klseg[cloud]" in result.stderr and "Traceback" not in result.output


def test_evaluate_function_takes_urls(s3, local_summary):
    import klseg_cli

    result = klseg_cli.evaluate("s3://klseg/pred", "s3://klseg/gt", classes=CLASSES, jobs=1)
    assert same(numbers(json.loads(json.dumps(result.summary()))), numbers(local_summary))


# --- Zarr ------------------------------------------------------------------------------


def _zarr_folders(tmp_path: Path, *, chunks=(16, 16)):
    """sample_data's predictions as Zarr stores: v3 (H, W, C), v2 (C, H, W), a group."""
    zarr = pytest.importorskip("zarr")
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, path in enumerate(sorted((SAMPLE / "predictions").iterdir())):
        arr = tifffile.imread(path) if path.suffix == ".tif" else np.load(path)
        hwc = arr if arr.shape[-1] == 5 else np.moveaxis(arr, 0, -1)
        store = str(pred / f"{path.stem}.zarr")
        if i % 3 == 0:
            z = zarr.create_array(store, shape=hwc.shape, chunks=(*chunks, 5), dtype=hwc.dtype)
            z[:] = hwc
        elif i % 3 == 1:
            chw = np.ascontiguousarray(np.moveaxis(hwc, -1, 0))
            z = zarr.create_array(store, shape=chw.shape, chunks=(1, *chunks), dtype=chw.dtype,
                                  zarr_format=2)  # fmt: skip
            z[:] = chw
        else:
            group = zarr.open_group(store, mode="w")
            group.create_array("probs", shape=hwc.shape, chunks=(*chunks, 5), dtype=hwc.dtype)
            group["probs"][:] = hwc
            group.create_array("features", shape=(2, 2), dtype="f4")  # so --zarr-path picks
    return pred


def test_zarr_maps_give_the_local_numbers(tmp_path, local_summary):
    pytest.importorskip("zarr")
    pred = _zarr_folders(tmp_path)
    out = tmp_path / "report"
    result = run(str(pred), str(SAMPLE / "ground_truth"), "--out", str(out), "--zarr-path",
                 "probs")  # fmt: skip
    # a group needs --zarr-path; plain arrays ignore it
    assert result.exit_code == 0, result.output
    got = json.loads((out / "summary.json").read_text())
    assert same(numbers(got), numbers(local_summary))
    no_key = run(str(pred), str(SAMPLE / "ground_truth"))
    assert no_key.exit_code == 2
    assert "Zarr group of 2 arrays (features, probs); choose one with --zarr-path" in no_key.stderr


def test_zarr_target_and_one_store(tmp_path):
    zarr = pytest.importorskip("zarr")
    from PIL import Image

    labels = np.asarray(Image.open(SAMPLE / "ground_truth" / "scene_00.png"))
    z = zarr.create_array(str(tmp_path / "gt.zarr"), shape=labels.shape, chunks=(8, 8),
                          dtype=labels.dtype)  # fmt: skip
    z[:] = labels
    pred = np.load(SAMPLE / "predictions" / "scene_00.npy")
    p = zarr.create_array(str(tmp_path / "p.zarr"), shape=pred.shape, chunks=(7, 9, 5),
                          dtype=pred.dtype)  # fmt: skip
    p[:] = pred
    a = run(str(tmp_path / "p.zarr"), str(tmp_path / "gt.zarr"), "--format", "json",
            "--chunk-pixels", "100")  # fmt: skip
    b = run(str(SAMPLE / "predictions" / "scene_00.npy"),
            str(SAMPLE / "ground_truth" / "scene_00.png"), "--format", "json",
            "--chunk-pixels", "100")  # fmt: skip
    assert a.exit_code == 0, a.output
    assert same(json.loads(a.stdout)["dataset"], json.loads(b.stdout)["dataset"])
    missing = run(str(tmp_path / "none.zarr"), str(tmp_path / "gt.zarr"))
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_zarr_on_s3(s3, tmp_path):
    zarr = pytest.importorskip("zarr")
    pred = np.load(SAMPLE / "predictions" / "scene_00.npy")
    local = tmp_path / "p.zarr"
    z = zarr.create_array(str(local), shape=pred.shape, chunks=(16, 16, 5), dtype=pred.dtype)
    z[:] = pred
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = f"zarr/p.zarr/{path.relative_to(local).as_posix()}"
            s3.put_object(Bucket="klseg", Key=key, Body=path.read_bytes())
    gt = str(SAMPLE / "ground_truth" / "scene_00.png")
    a = run("s3://klseg/zarr/p.zarr", gt, "--format", "json")
    b = run(str(SAMPLE / "predictions" / "scene_00.npy"), gt, "--format", "json")
    assert a.exit_code == 0, a.output
    assert same(json.loads(a.stdout)["dataset"], json.loads(b.stdout)["dataset"])


# --- https:// and file:// ----------------------------------------------------------------


@pytest.fixture
def http_server():
    """sample_data over HTTP on a free 127.0.0.1 port, with byte ranges (as a CDN or an
    object store's HTTP endpoint serves them); index pages list the folders."""
    import functools
    import http.server
    import io
    import os
    import re
    import threading

    pytest.importorskip("aiohttp")

    class RangeHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            ranges = self.headers.get("Range")
            path = self.translate_path(self.path)
            if not ranges or os.path.isdir(path):
                return super().send_head()
            m = re.match(r"bytes=(\d+)-(\d*)", ranges)
            size = os.path.getsize(path)
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read(end - start + 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return io.BytesIO(data)

    handler = functools.partial(RangeHandler, directory=str(SAMPLE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_folders_and_file_urls(http_server, local_summary):
    result = run(f"{http_server}/predictions/", f"{http_server}/ground_truth/", "--format", "json")
    assert result.exit_code == 0, result.output
    assert same(numbers(json.loads(result.stdout)), numbers(local_summary))
    url = f"{http_server}/predictions/nothing.npy"
    missing = run(url, f"{http_server}/ground_truth/scene_00.png")
    assert missing.exit_code == 2, missing.output
    assert missing.stderr.strip() == f"Error: {url}: no such object"
    local = run(f"file://{SAMPLE / 'predictions'}", f"file://{SAMPLE / 'ground_truth'}",
                "--format", "json")  # fmt: skip
    assert local.exit_code == 0, local.output
    assert same(numbers(json.loads(local.stdout)), numbers(local_summary))
