"""The optional compiled kernel (klseg[fast]) gives the NumPy path's numbers."""

import numpy as np
import pytest

from klseg_cli.core import _fast
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.engine.image import image_stats
from klseg_cli.io.readers import PredictionMap

from ..conftest import NO_NUMBA, assert_kernel_took, random_probs, recording_kernel

# Skipped only on request: CI installs the ``fast`` extra, and a kernel that is not tested
# must fail the suite (test_numba_imports), not vanish from it.
pytestmark = pytest.mark.skipif(NO_NUMBA, reason="KLSEG_NO_NUMBA is set")


def test_numba_imports():
    assert _fast.AVAILABLE, (
        "numba does not import, so the compiled kernel is untested: "
        "pip install -e '.[fast]', or set KLSEG_NO_NUMBA=1 to test without it"
    )


def n_chunks(pm, chunk):
    return -(-pm.n_pixels // chunk)


def kernel_stats(pm, labels, s, chunk=4096, *, kernel_takes_all=True):
    """``image_stats`` through the kernel, checking that the kernel took every chunk (by
    default) or at least was called for every chunk."""
    with recording_kernel() as taken:
        fast = image_stats(pm, labels, s, chunk_pixels=chunk, accelerate=True)
    if kernel_takes_all:
        assert_kernel_took(taken, n_chunks(pm, chunk))
    else:
        assert len(taken) == n_chunks(pm, chunk), "the kernel was not called for every chunk"
    return fast


def both(pm, labels, s, chunk=4096, *, kernel_takes_all=True):
    """The NumPy path's Stats and the kernel's; by default also checks that the kernel
    took every chunk (none went back to the NumPy path)."""
    ref = image_stats(pm, labels, s, chunk_pixels=chunk, accelerate=False)
    return ref, kernel_stats(pm, labels, s, chunk, kernel_takes_all=kernel_takes_all)


def assert_equivalent(ref, fast):
    np.testing.assert_array_equal(fast.confusion, ref.confusion)
    np.testing.assert_array_equal(fast.ece_count, ref.ece_count)
    np.testing.assert_array_equal(fast.ece_correct, ref.ece_correct)
    assert fast.n_clipped == ref.n_clipped
    np.testing.assert_allclose(fast.sums, ref.sums, rtol=2e-7, equal_nan=True)
    np.testing.assert_allclose(fast.class_kl, ref.class_kl, rtol=2e-7)
    np.testing.assert_allclose(fast.class_ce, ref.class_ce, rtol=2e-7)
    np.testing.assert_allclose(fast.ece_conf, ref.ece_conf, rtol=1e-12)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("C", [2, 5, 19])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kernel_equals_numpy_path(rng, layout, C, dtype):
    h, w = 37, 61
    p = random_probs(rng, h * w, C, saturate=0.3).reshape(h, w, C).astype(dtype)
    p[0, :5] = 0.0
    p[0, :5, :2] = 0.5  # ties go to the lower class
    p[1, :3] = 0.0
    p[1, :3, -1] = 1.0  # saturated: exact 0 and 1, clipped at eps
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    labels[2] = 255
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    ref, fast = both(PredictionMap("mem", arr, layout), labels, MetricSettings(num_classes=C))
    assert ref.n_clipped > 0
    assert_equivalent(ref, fast)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("chunk", [1, 97, 300, 1 << 15])
@pytest.mark.parametrize("label_dtype", [np.uint8, np.uint16, np.int32, np.int64, ">u2", ">i4"])
def test_any_chunk_tile_and_label_dtype(rng, layout, chunk, label_dtype):
    """Chunks that end inside a tile, single pixels, every label dtype, signed ignore values."""
    h, w, C = 23, 29, 7
    p = random_probs(rng, h * w, C, saturate=0.2).reshape(h, w, C)
    labels = rng.integers(0, C, size=(h, w)).astype(label_dtype)
    labels[5, 3:20] = 200  # ignored
    ignore = (200,)
    if np.dtype(label_dtype).kind == "i":
        labels[7, :11] = -1
        ignore = (-1, 200)
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    s = MetricSettings(num_classes=C, ignore_index=ignore)
    ref, fast = both(PredictionMap("mem", arr, layout), labels, s, chunk=chunk)
    assert fast.n_valid == ref.n_valid == h * w - 17 - (11 if ignore[0] == -1 else 0)
    assert_equivalent(ref, fast)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_ignore_value_just_past_the_classes(rng, layout):
    """An ignore value equal to C (the first label that is not a class) is masked in the
    kernel as in the NumPy path: the kernel must not read a class plane C."""
    h, w, C = 16, 20, 5
    p = random_probs(rng, h * w, C).reshape(h, w, C)
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    labels[3:6] = C
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    s = MetricSettings(num_classes=C, ignore_index=(C, 255))
    ref, fast = both(PredictionMap("mem", arr, layout), labels, s, chunk=97)
    assert fast.n_valid == ref.n_valid == h * w - 3 * w
    assert_equivalent(ref, fast)


def test_image_with_every_pixel_ignored(rng):
    """No valid pixel: both paths give the same empty Stats, reverse KL 0 (nothing is
    undefined) rather than NaN, so merging it into other images' totals changes nothing."""
    p = random_probs(rng, 30 * 40, 3).reshape(30, 40, 3)
    labels = np.full((30, 40), 255, np.uint8)
    ref, fast = both(PredictionMap("mem", p, "hwc"), labels, MetricSettings(num_classes=3), 500)
    assert ref.n_valid == fast.n_valid == 0
    assert ref.sums.tolist() == fast.sums.tolist() == [0.0] * 6
    assert_equivalent(ref, fast)


def test_log_is_accurate():
    """The kernel's log is within ~1 float32 ulp of log x; finite at 0, as is 0·log 0 = 0."""
    x = np.concatenate(
        [np.geomspace(np.finfo(np.float32).tiny, 1, 200001), np.linspace(0.5, 2.0, 100001),
         [1.0, 0.5, 0.999999, 1.0000001, 1e-7, 3.4e38]]
    ).astype(np.float32)  # fmt: skip
    bits = x.view(np.int32)
    got = np.array([_fast._log(b) for b in bits[::37]] + [_fast._log(b) for b in bits[-6:]])
    xs = np.concatenate([x[::37], x[-6:]]).astype(np.float64)
    exact = np.log(xs)
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert ulps[exact != 0].max() < 2.0
    assert got[xs == 1.0].max() == 0.0
    zero = _fast._log(np.int32(0))
    assert np.isfinite(zero) and zero < -80


def test_bad_chunks_fall_back_to_the_numpy_diagnosis(rng):
    from klseg_cli.core.stats import Stats
    from klseg_cli.errors import ProbabilityError

    p = random_probs(rng, 100, 3).reshape(10, 10, 3)
    labels = np.zeros((10, 10), np.uint8)
    s = MetricSettings(num_classes=3)
    for bad, match in ((np.nan, "NaN"), (-0.5, "logits"), (1.5, "logits"), (np.inf, "NaN")):
        q = p.copy()
        q[3, 3, 1] = bad
        with recording_kernel() as taken, pytest.raises(ProbabilityError, match=match):
            image_stats(PredictionMap("mem", q, "hwc"), labels, s, accelerate=True)
        assert taken == [False]  # the kernel refused the chunk; NumPy said why
    # a refused chunk leaves the totals untouched
    total = Stats.zeros(3, s.ece_bins)
    half = np.ascontiguousarray(p.reshape(-1, 3).T * 0.5)
    assert not _fast.add_chunk(total, half, labels.reshape(-1), s, 1e-3)
    assert total.n_valid == 0 and not total.sums.any() and not total.ece_conf.any()
    assert _fast.add_chunk(total, half * 2, labels.reshape(-1), s, 1e-3)
    assert total.n_valid == 100


def test_bad_values_under_ignored_pixels_do_not_matter(rng):
    """NumPy drops ignored pixels before checking; the kernel masks them: same results."""
    p = random_probs(rng, 64 * 50, 4).reshape(64, 50, 4)
    labels = rng.integers(0, 4, size=(64, 50)).astype(np.uint8)
    labels[10:12] = 255
    p[10, :, 0] = np.nan
    p[11, :, 1] = -3.0
    s = MetricSettings(num_classes=4)
    ref, fast = both(PredictionMap("mem", p, "hwc"), labels, s, chunk=256, kernel_takes_all=False)
    assert_equivalent(ref, fast)


def test_out_of_scope_settings_use_numpy():
    assert _fast.supported(MetricSettings(num_classes=3), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3, smoothing=0.1), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3, input_kind="logits"), np.float32)
    assert not _fast.supported(MetricSettings(num_classes=3), np.float64)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_files_read_by_blocks_equal_maps_in_memory(tmp_path, rng, layout):
    """Memory-mapped .npy maps go through pread'd chunks, arrays in memory are read in
    place (CHW): both give the NumPy path's numbers."""
    from klseg_cli.io.readers import open_prediction

    h, w, C = 40, 70, 6
    p = random_probs(rng, h * w, C, saturate=0.1).reshape(h, w, C)
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    np.save(tmp_path / "p.npy", arr)
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    labels[::7] = 255
    s = MetricSettings(num_classes=C)
    on_disk = open_prediction(tmp_path / "p.npy", hw=(h, w))
    assert isinstance(on_disk.array, np.memmap)
    in_memory = PredictionMap("mem", arr, layout)
    assert (in_memory.planes_in_memory() is not None) == (layout == "chw")
    ref = image_stats(in_memory, labels, s, chunk_pixels=500, accelerate=False)
    for pm in (on_disk, in_memory):
        assert_equivalent(ref, kernel_stats(pm, labels, s, chunk=500))


def test_jobs_run_kernel_maps_in_threads_with_identical_results(monkeypatch):
    """Maps the kernel takes run in threads (it releases the GIL); the rest in processes.
    Any --jobs gives the same numbers to the last bit, and the kernel's are the NumPy
    path's (to float32 rounding) — the kernel having taken every chunk of every image."""
    import math
    from pathlib import Path

    from klseg_cli import evaluate
    from klseg_cli.core.chunks import chunk_for
    from klseg_cli.engine import image
    from klseg_cli.engine import local as evaluation
    from klseg_cli.io.opening import open_pair
    from klseg_cli.render.report import summary_json

    sample = Path(__file__).resolve().parents[2] / "sample_data"
    args = (sample / "predictions", sample / "ground_truth")
    job = evaluation.plan(*args)
    assert evaluation.parallel_backend(job) == "processes"  # small maps: the NumPy path
    numpy_path = evaluate(*args, jobs=2).summary()
    monkeypatch.setattr(evaluation, "FAST_MIN_VALUES", 0)  # now every map takes the kernel
    monkeypatch.setattr(image, "FAST_MIN_VALUES", 0)
    assert evaluation.parallel_backend(job) == "threads"
    chunks = 0
    for pair in job.pairing.pairs:
        pm = open_pair(pair, soft_gt=False, num_classes=None, read=job.read).pred
        chunks += n_chunks(pm, chunk_for(job.read.chunk_pixels, pm.num_classes))
    texts = []
    for j in (1, 2, 3):
        with recording_kernel() as taken:
            result = evaluate(*args, jobs=j).summary()
        assert_kernel_took(taken, chunks)
        texts.append(summary_json(result))
    assert texts[0] == texts[1] == texts[2]

    def same(a, b):
        if isinstance(a, float) or isinstance(b, float):
            return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6)
        return a == b

    kernel = result
    for key, value in numpy_path["dataset"].items():
        assert same(kernel["dataset"][key], value), key
    for scope in ("classes", "images"):
        for a, b in zip(kernel[scope], numpy_path[scope], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert same(a[key], b[key]), (scope, key, a[key], b[key])


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_big_endian_maps_and_labels(rng, layout):
    """numba takes native byte order only: other orders are converted, not refused."""
    h, w, C = 30, 40, 4
    p = random_probs(rng, h * w, C).reshape(h, w, C)
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    labels = rng.integers(0, C, size=(h, w)).astype(">u2")
    s = MetricSettings(num_classes=C)
    ref = image_stats(PredictionMap("mem", arr, layout), labels, s, accelerate=False)
    fast = kernel_stats(PredictionMap("mem", arr.astype(">f4"), layout), labels, s, chunk=500)
    assert_equivalent(ref, fast)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_one_worker_reads_the_next_chunk_in_a_read_ahead_thread(tmp_path, rng, layout):
    """P15 #4: with one worker, a second thread reads chunk k+1 (from the file, into the
    other of two buffers) while the kernel computes chunk k; the sums are those of the
    plain loop to the last bit, and bad values (also under ignored pixels) still take the
    NumPy path (an error, or computed)."""
    import threading

    h, w, C = 64, 96, 5
    p = random_probs(rng, h * w, C).reshape(h, w, C)
    labels = rng.integers(0, C, size=(h, w)).astype(np.uint8)
    labels[40:44] = 255
    arr = p if layout == "hwc" else np.ascontiguousarray(p.transpose(2, 0, 1))
    path = tmp_path / "p0.npy"
    np.save(path, arr.astype(np.float32))
    pm = PredictionMap(path, np.load(path, mmap_mode="r"), layout)
    s = MetricSettings(num_classes=C)
    threads = set()
    real = PredictionMap._read_rows

    def spy(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(self, *args, **kwargs)

    PredictionMap._read_rows = spy
    try:
        plain = image_stats(pm, labels, s, chunk_pixels=700, accelerate=True)
        assert not any(t.startswith("klseg-read") for t in threads)
        with recording_kernel() as taken:
            ahead = image_stats(pm, labels, s, chunk_pixels=700, accelerate=True,
                                read_ahead=True)  # fmt: skip
        assert_kernel_took(taken, -(-h * w // 700))
        assert any(t.startswith("klseg-read") for t in threads)
    finally:
        PredictionMap._read_rows = real
    for field in ("sums", "confusion", "class_kl", "ece_count", "ece_conf"):
        np.testing.assert_array_equal(getattr(ahead, field), getattr(plain, field))
    arr2 = arr.astype(np.float32)
    if layout == "hwc":
        arr2[5, 5] = np.nan
    else:
        arr2[:, 5, 5] = np.nan
    np.save(tmp_path / "p1.npy", arr2)
    bad = PredictionMap(tmp_path / "p1.npy", np.load(tmp_path / "p1.npy", mmap_mode="r"), layout)
    with pytest.raises(Exception, match="NaN"):
        image_stats(bad, labels, s, chunk_pixels=700, accelerate=True, read_ahead=True)


def test_serial_evaluation_turns_read_ahead_on_where_a_second_core_is_idle(monkeypatch, tmp_path):
    from klseg_cli.engine import local

    seen = []
    real = local.evaluate_pair

    def spy(pair, settings, *, read):
        seen.append(read.read_ahead)
        return real(pair, settings, read=read)

    monkeypatch.setattr(local, "evaluate_pair", spy)
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "sample_data"
    import os

    for cores, load, want in ((2, 0.3, True), (1, 0.0, False), (2, 1.5, False), (4, 2.5, True)):
        seen.clear()
        monkeypatch.setattr(local, "available_cores", lambda cores=cores: cores)
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        local.evaluate(sample / "predictions", sample / "ground_truth", jobs=1)
        assert seen and set(seen) == {want}, (cores, load)
