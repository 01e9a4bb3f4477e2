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


# --- --rater: the multi-rater counts -----------------------------------------------------------

RATERS = [f"sample_data/raters/rater_{r}" for r in "abc"]


@pytest.fixture(scope="module")
def rater_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rater_report")
    args = ["evaluate", SAMPLE[0], "--classes", "sample_data/classes.txt", "--out", str(out),
            "--samples", SAMPLE[0], "--samples", "sample_data/predictions_b"]  # fmt: skip
    for r in RATERS:
        args += ["--rater", r]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_rater_counts_are_stored_per_image(rater_report):
    with np.load(rater_report / "stats.npz", allow_pickle=False) as data:
        n, C = len(data["stems"]), 5
        assert data["rater_items"].tolist() == [3, 2]  # 3 raters, 2 samples: 6 items
        assert data["rater_dice_joint"].shape == (n, C, 10, 10)
        assert data["rater_pair_inter"].shape == data["rater_pair_union"].shape == (n, 15, C)
        assert all(data[f"rater_{f}"].dtype == np.int64 for f in ("dice_joint", "pair_inter"))
        assert json.loads(str(data["rater_settings"]))["count"] == 3
        fields = [str(f) for f in data["fields"]]
    assert not any(f.startswith("rater_") for f in fields)  # old readers skip them


def test_rater_summary_recomputed_from_stats_alone(rater_report):
    """Every multi-rater number of summary.json — pooled and image mean, per class, per
    image, settings.raters — comes back from stats.npz without reading a pixel."""
    summary = json.loads((rater_report / "summary.json").read_text())
    table = statsfile.load_stats(rater_report / "stats.npz")
    again = jsonable(table.to_result().summary())
    assert "ged_pooled" in again["dataset"] and "soft_dice" in again["classes"][0]
    assert again["dataset"] == summary["dataset"]
    assert again["classes"] == summary["classes"]
    assert again["images"] == summary["images"]
    assert again["settings"] == summary["settings"]
    sub = table.select(table.stems[:3])  # a subset keeps its images' counts
    assert np.array_equal(sub.rater_arrays["pair_inter"], table.rater_arrays["pair_inter"][:3])
    assert sub.rater_items == table.rater_items


def test_a_stats_npz_without_rater_counts_still_reads(rater_report, tmp_path):
    """A file from before the counts were stored (or a reader's view of a plain run): the
    §2 sums read as before, the rater scores are simply not rebuilt."""
    with np.load(rater_report / "stats.npz", allow_pickle=False) as data:
        old = {k: data[k] for k in data.files if not k.startswith("rater_")}
    np.savez_compressed(tmp_path / "stats.npz", **old)
    table = statsfile.load_stats(tmp_path / "stats.npz")
    assert table.rater_items is None and table.rater_stats(0) is None
    again = table.to_result().summary()
    assert "ged_pooled" not in again["dataset"] and "kl_pooled" in again["dataset"]


@pytest.mark.parametrize(
    "change, why",
    [
        ({"rater_pair_inter": np.zeros((8, 14, 5), np.int64)}, "rater_pair_inter"),
        ({"rater_dice_joint": np.zeros((8, 5, 10, 10))}, "rater_dice_joint"),
        ({"rater_items": np.array([1, 0])}, "rater_items"),
        ({"rater_settings": np.array("{not json")}, "bad rater entry"),
    ],
)
def test_bad_rater_entries_are_input_errors(rater_report, tmp_path, change, why):
    with np.load(rater_report / "stats.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(change)
    np.savez_compressed(tmp_path / "stats.npz", **arrays)
    with pytest.raises(InputError, match=why):
        statsfile.load_stats(tmp_path / "stats.npz")


def test_gate_and_baseline_read_the_pooled_rater_scores_back(rater_report, tmp_path):
    """``gate`` recomputes the pooled rater intervals from stats.npz; ``--baseline`` pairs
    them (delta and its interval) with a new run."""
    summary = json.loads((rater_report / "summary.json").read_text())
    res = CliRunner().invoke(app, ["gate", str(rater_report / "summary.json"), "--require",
                                   "high(ged_pooled) <= 1", "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["requirements"]
    assert row["passed"] and summary["dataset"]["ged_pooled"] < row["value"] < 1
    args = ["evaluate", "sample_data/predictions_b", "--classes", "sample_data/classes.txt",
            "--samples", SAMPLE[0], "--samples", "sample_data/predictions_b",
            "--baseline", str(rater_report / "summary.json"), "--bootstrap", "200",
            "--require", "delta(soft_dice_pooled) >= -1", "--out", str(tmp_path / "b")]  # fmt: skip
    for r in RATERS:
        args += ["--rater", r]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    new = json.loads((tmp_path / "b" / "summary.json").read_text())
    # the same --samples in both runs: the GED (of the samples) does not change at all
    assert new["delta"]["ged_pooled"] == 0 and new["delta_ci"]["ged_pooled"] == [0, 0]
    for name in ("soft_dice_pooled", "miou_vs_raters_pooled"):
        lo, hi = new["delta_ci"][name]
        assert lo < new["delta"][name] < hi, name
        assert new["delta"][name] == pytest.approx(
            new["dataset"][name] - summary["dataset"][name], rel=1e-9
        )
