"""``klseg evaluate --scheduler``: a real Dask scheduler and two workers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app

from ..commands.test_api import SAMPLE, same
from ..io.test_remote import _free_port

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.cluster

CLASSES = str(SAMPLE / "classes.txt")
START_TIMEOUT = 60  # seconds for the scheduler and both workers to come up


def evaluate(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args, "--classes", CLASSES])


def numbers(summary: dict) -> dict:
    return {k: summary[k] for k in ("dataset", "classes", "images", "n_valid", "n_images")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes (one thread each) on free
    127.0.0.1 ports, started and torn down here; the workers' environment arms the
    die-once fault of engine_dask for the test that wants it."""
    tmp = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, _KLSEG_TEST_DIE_ONCE=str(tmp / "die-once"), PYTHONUNBUFFERED="1")
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    logs = [open(tmp / name, "w") for name in ("scheduler.log", "worker0.log", "worker1.log")]
    procs = [
        subprocess.Popen(
            [*dask, "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=logs[0],
            start_new_session=True,
        )
    ]  # fmt: skip
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--name",
                    f"w{i}",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=logs[i + 1],
                start_new_session=True,
                cwd=tmp,
            )
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with distributed.Client(address, timeout=5) as client:
                    client.wait_for_workers(2, timeout=max(1, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield {"address": address, "marker": tmp / "die-once"}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def local_summary(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("local") / "report"
    result = evaluate(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"), "--jobs", "1",
                      "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def test_cluster_gives_the_numbers_of_jobs_1(cluster, local_summary, tmp_path):
    out = tmp_path / "report"
    result = evaluate(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"),
                      "--scheduler", cluster["address"], "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads((out / "summary.json").read_text())
    assert same(numbers(got), numbers(local_summary))
    assert (out / "stats.npz").exists() and (out / "per_image.csv").exists()


def test_scheduler_from_the_environment(cluster, local_summary, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster["address"])
    result = evaluate(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"), "--format",
                      "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert same(numbers(json.loads(result.stdout)), numbers(local_summary))


def test_a_worker_that_dies_has_its_task_retried(cluster, local_summary):
    cluster["marker"].write_text("armed\n")
    try:
        result = evaluate(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"),
                          "--scheduler", cluster["address"], "--format", "json")  # fmt: skip
    finally:
        cluster["marker"].unlink()
    assert result.exit_code == 0, result.output
    assert cluster["marker"].with_name("die-once.done").exists()  # a worker did die
    assert same(numbers(json.loads(result.stdout)), numbers(local_summary))


def test_an_input_error_on_a_worker_is_one_line_and_exit_2(cluster, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(SAMPLE / "predictions", pred)
    (pred / "scene_02.npy").write_bytes((pred / "scene_02.npy").read_bytes()[:200])
    args = [str(pred), str(SAMPLE / "ground_truth"), "--scheduler", cluster["address"]]
    result = evaluate(*args)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: {pred / 'scene_02.npy'}: is truncated: its header promises shape "
        f"{tuple(np.load(SAMPLE / 'predictions' / 'scene_02.npy').shape)} "
        f"({np.load(SAMPLE / 'predictions' / 'scene_02.npy').nbytes + 128:,} bytes) but the "
        "file has 200 bytes"
    )
    kept = evaluate(*args, "--keep-going", "--format", "json")
    assert kept.exit_code == 2
    summary = json.loads(kept.stdout)
    assert summary["n_images"] == 7
    assert [e["file"] for e in summary["errors"]] == [str(pred / "scene_02.npy")]


def test_one_big_zarr_map_split_across_workers(cluster, tmp_path):
    zarr = pytest.importorskip("zarr")
    from klseg_cli.engine.dask_cluster import dask_evaluate
    from klseg_cli.engine.local import evaluate as local_evaluate

    rng = np.random.default_rng(5)
    C, H, W = 4, 300, 200
    p = rng.dirichlet(np.ones(C) * 0.5, size=(H, W)).astype(np.float32)
    y = rng.integers(0, C, size=(H, W)).astype(np.uint8)
    y[:10] = 255
    (tmp_path / "p").mkdir()
    (tmp_path / "y").mkdir()
    z = zarr.create_array(str(tmp_path / "p" / "big.zarr"), shape=(C, H, W), chunks=(C, 32, 64),
                          dtype="f4")  # fmt: skip
    z[:] = np.moveaxis(p, -1, 0)
    t = zarr.create_array(str(tmp_path / "y" / "big.zarr"), shape=(H, W), chunks=(32, 64),
                          dtype="u1")  # fmt: skip
    t[:] = y
    args = (str(tmp_path / "p" / "big.zarr"), str(tmp_path / "y" / "big.zarr"))
    ticks = []
    split = dask_evaluate(
        *args, scheduler=cluster["address"], block_rows=64, on_start=ticks.append,
        on_image=lambda pair: ticks.append(pair.stem),
    )  # fmt: skip
    assert ticks[0] == 5 and len(ticks) == 6  # 300 rows in blocks of 64: five tasks
    whole = local_evaluate(*args, jobs=1)
    a, b = split.summary(), whole.summary()
    assert a["n_valid"] == b["n_valid"] == (H - 10) * W
    np.testing.assert_array_equal(split.total.confusion, whole.total.confusion)
    for key, value in b["dataset"].items():
        assert a["dataset"][key] == pytest.approx(value, rel=1e-12, abs=1e-15, nan_ok=True), key


def test_workers_use_the_clients_timeout(cluster):
    """The workers' environment sets no KLSEG_TIMEOUT (their default is 60 s): a map whose
    server stalls is given up after the 1 s the client was told, on the worker."""
    from klseg_cli.engine.dask_cluster import dask_evaluate
    from klseg_cli.errors import ReadError

    from ..io.faulty_http import FaultyServer

    files = {"/p/a.npy": (SAMPLE / "predictions" / "scene_00.npy").read_bytes(),
             "/g/a.png": (SAMPLE / "ground_truth" / "scene_00.png").read_bytes()}  # fmt: skip
    with FaultyServer(files, "stall-get") as server:  # the client only asks sizes (HEAD)
        t0 = time.monotonic()
        with pytest.raises(ReadError) as caught:
            dask_evaluate(f"{server.url}/p/a.npy", f"{server.url}/g/a.png", classes=CLASSES,
                          scheduler=cluster["address"], block_rows=0, timeout=1)  # fmt: skip
        seconds = time.monotonic() - t0
    assert "timed out: no data from the server for 1 s" in str(caught.value)
    assert seconds < 20


def test_missing_zarr_chunks_of_a_split_map_count_once(cluster, tmp_path):
    """Blocks of a split map report the chunks they found missing; the client unites them:
    the counts of a whole-map run, under the paths as given."""
    zarr = pytest.importorskip("zarr")
    from klseg_cli.engine.dask_cluster import dask_evaluate
    from klseg_cli.engine.local import evaluate as local_evaluate

    rng = np.random.default_rng(6)
    C, H, W = 2, 200, 100
    p = rng.dirichlet(np.ones(C), size=(H, W)).astype(np.float32)
    y = rng.integers(0, C, size=(H, W)).astype(np.uint8)
    stores = (("p", p, (48, 50, C), 0.5), ("y", y, (80, 50), 0))  # 0.5: a valid pixel of 2
    for name, arr, chunks, fill in stores:
        (tmp_path / name).mkdir()
        z = zarr.create_array(str(tmp_path / name / "m.zarr"), shape=arr.shape, chunks=chunks,
                              dtype=arr.dtype, fill_value=fill)  # fmt: skip
        z[:] = arr
    (tmp_path / "p" / "m.zarr" / "c" / "1" / "1" / "0").unlink()
    (tmp_path / "y" / "m.zarr" / "c" / "1" / "0").unlink()  # rows 80..160: three blocks
    args = (str(tmp_path / "p" / "m.zarr"), str(tmp_path / "y" / "m.zarr"))
    with pytest.warns(UserWarning, match="1 Zarr chunk missing"):
        split = dask_evaluate(*args, classes=["a", "b"], scheduler=cluster["address"],
                              block_rows=48)  # fmt: skip
    with pytest.warns(UserWarning, match="1 Zarr chunk missing"):
        whole = local_evaluate(*args, classes=["a", "b"], jobs=1)
    counts = split.summary()["zarr_missing_chunks"]
    assert counts == whole.summary()["zarr_missing_chunks"]
    assert counts["total"] == 2 and [f["file"] for f in counts["files"]] == sorted(args)


def test_local_cluster_and_missing_extra(local_summary, monkeypatch):
    result = evaluate(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"),
                      "--scheduler", "local:2", "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert same(numbers(json.loads(result.stdout)), numbers(local_summary))
    monkeypatch.setitem(sys.modules, "distributed", None)
    missing = evaluate(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"),
                       "--scheduler", "local:2")  # fmt: skip
    assert missing.exit_code == 2 and "klseg[dask]" in missing.stderr


def test_unreachable_scheduler_is_a_usage_error(monkeypatch):
    import klseg_cli.engine.dask_cluster as engine

    monkeypatch.setattr(engine, "CONNECT_TIMEOUT", 2)
    result = evaluate(str(SAMPLE / "predictions"), str(SAMPLE / "ground_truth"),
                      "--scheduler", f"tcp://127.0.0.1:{_free_port()}")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "cannot reach the Dask scheduler" in result.stderr
