"""stats.npz: written beside every report, read back without pickles, enough to recompute it."""

import dataclasses
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.core.metrics import MetricSettings
from klseg_cli.core.stats import Stats, pixel_metrics, pixel_metrics_batch
from klseg_cli.engine.local import evaluate
from klseg_cli.errors import InputError
from klseg_cli.io import statsfile
from klseg_cli.render.formats import jsonable

SAMPLE = ("sample_data/predictions", "sample_data/ground_truth")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(
        app, ["evaluate", *SAMPLE, "--classes", "sample_data/classes.txt", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def test_layout_loads_without_pickles(report):
    with np.load(report / "stats.npz", allow_pickle=False) as data:
        files = set(data.files)
        assert str(data["format"]) == statsfile.FORMAT
        fields = [str(f) for f in data["fields"]]
        opt_in = ("unc_hist", "unc_sum")  # --uncertainty's histograms: stored when computed
        assert fields == [f.name for f in dataclasses.fields(Stats) if f.name not in opt_in]
        n = len(data["stems"])
        assert n == 8
        assert data["confusion"].shape == (n, 5, 5) and data["confusion"].dtype == np.int64
        assert data["sums"].shape == (n, 6) and data["sums"].dtype == np.float64
        assert data["n_clipped"].shape == (n,) and data["n_clipped"].dtype == np.int64
        for name in fields:
            assert data[name].dtype in (np.float64, np.int64)
        settings = json.loads(str(data["settings"]))
    assert files == {*statsfile.META_KEYS, *fields}
    assert settings["classes"] == ["road", "building", "vegetation", "sky", "car"]


def test_summary_recomputed_from_stats_alone(report):
    """summary.json's dataset, classes and images from stats.npz, no pixel read again."""
    summary = json.loads((report / "summary.json").read_text())
    table = statsfile.load_stats(report / "stats.npz")
    again = jsonable(table.to_result().summary())
    assert again["dataset"] == summary["dataset"]
    assert again["classes"] == summary["classes"]
    assert again["images"] == summary["images"]
    assert again["settings"] == summary["settings"]
    assert again["n_valid"] == summary["n_valid"]


def test_new_stats_fields_are_picked_up(monkeypatch):
    """A field added to Stats is stored and read back with no change to statsfile."""

    @dataclasses.dataclass
    class Wider(Stats):
        fine_hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(7))
        optional: np.ndarray | None = None

    monkeypatch.setattr(statsfile, "Stats", Wider)
    base = Stats.zeros(3, 4)
    images = [Wider(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Stats)},
                    fine_hist=np.arange(7.0) * k) for k in range(3)]  # fmt: skip
    arrays = statsfile.stack_stats(images, images[0])
    assert arrays["fine_hist"].shape == (3, 7) and "optional" not in arrays
    table = statsfile.StatsTable(["a", "b", "c"], np.ones(3, np.int64), np.ones(3, np.int64),
                                 MetricSettings(num_classes=3).as_dict(), arrays)  # fmt: skip
    assert np.array_equal(table.image_stats(2).fine_hist, np.arange(7.0) * 2)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"not a zip", "not a klseg stats.npz"),
        ("objects", "not a klseg stats.npz"),
        ("other", "no format tag"),
    ],
)
def test_bad_files_are_input_errors(tmp_path, content, why):
    path = tmp_path / "stats.npz"
    if content == "objects":
        np.savez(path, format=np.array(statsfile.FORMAT), stems=np.array([{"a": 1}], dtype=object))
    elif content == "other":
        np.savez(path, x=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=why):
        statsfile.load_stats(path)


@pytest.mark.parametrize("ignore", [(255,), (0, 255)])
def test_batched_formulas_equal_pixel_metrics(rng, ignore):
    """pixel_metrics_batch over stacked Stats == pixel_metrics of each (NaN where undefined).

    With an ignore value inside 0..C-1 too: the class means must leave out the same classes.
    """
    C, bins = 4, 15
    settings = MetricSettings(num_classes=C, log_base=2, ignore_index=ignore)
    stats = []
    for k in range(12):
        s = Stats.zeros(C, bins)
        if k != 0:  # image 0: no valid pixel
            s.confusion = rng.integers(0, 50, size=(C, C)) * (rng.random((C, C)) < 0.6)
            s.confusion[2] = 0  # class 2 never a target...
            s.confusion[:, 2] = 0  # ... nor predicted: undefined IoU
            s.sums = rng.random(6) * s.confusion.sum()
            if k % 3 == 0:
                s.sums[1] = np.nan
            s.ece_count = rng.integers(0, 20, size=bins)
            s.ece_conf = s.ece_count * rng.random(bins)
            s.ece_correct = (s.ece_count * rng.random(bins)).astype(np.int64)
        stats.append(s)
    arrays = statsfile.stack_stats(stats, Stats.zeros(C, bins))
    batch = pixel_metrics_batch(arrays, settings)
    for k, s in enumerate(stats):
        one = pixel_metrics(s, settings)
        for name, value in one.items():
            got = batch[name][k]
            assert (math.isnan(value) and math.isnan(got)) or got == pytest.approx(
                value, rel=1e-12, abs=1e-15
            ), (k, name)


def test_evaluation_result_round_trip_in_memory(tmp_path):
    result = evaluate(*SAMPLE)
    table = statsfile.StatsTable.from_result(result)
    statsfile.write_stats(table, tmp_path / "s.npz")
    back = statsfile.load_stats(tmp_path / "s.npz")
    assert back.stems == sorted(i.stem for i in result.images)
    for name, arr in table.arrays.items():
        assert np.array_equal(back.arrays[name], arr, equal_nan=True)
