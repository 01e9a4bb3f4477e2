"""evaluate against several raters (engine/raters.py, io/raters.py)."""

import math

import numpy as np
import pytest
from PIL import Image

from klseg_cli.core.raters import RaterStats, rater_values
from klseg_cli.engine.local import evaluate
from klseg_cli.engine.raters import evaluate_raters
from klseg_cli.errors import InputError, LabelError, ShapeError, UsageError
from klseg_cli.io.raters import RaterMasks, pair_raters

from ..conftest import random_probs

C = 4


def write_set(root, rng, *, n_images=3, h=13, w=17, R=3, ignore=0.0, all_ignored=0.0):
    """pred/ (HWC .npy), raters r0.. (PNG masks): returns (pred dir, rater dirs, masks)."""
    pred = root / "pred"
    pred.mkdir()
    dirs = [root / f"r{r}" for r in range(R)]
    for d in dirs:
        d.mkdir()
    masks = {}
    for i in range(n_images):
        stem = f"img{i}"
        np.save(pred / f"{stem}.npy", random_probs(rng, h * w, C).reshape(h, w, C))
        truth = rng.integers(0, C, (h, w))
        dead = rng.random((h, w)) < all_ignored
        drawn = []
        for _ in dirs:
            m = np.where(rng.random((h, w)) < 0.25, rng.integers(0, C, (h, w)), truth)
            m[rng.random((h, w)) < ignore] = 255
            drawn.append(m.astype(np.uint8))
        nobody = np.all([m == 255 for m in drawn], axis=0)
        drawn[0][nobody] = truth[nobody]  # every pixel labelled by some rater ...
        for m in drawn:
            m[dead] = 255  # ... but the ``all_ignored`` share
        for d, m in zip(dirs, drawn):
            Image.fromarray(m, mode="L").save(d / f"{stem}.png")
        masks[stem] = drawn
    return pred, dirs, masks


def frequency_file(folder, masks):
    """Each image's frequency map saved as a float32 (H, W, C) .npy (a --soft-gt target)."""
    folder.mkdir()
    for stem, ms in masks.items():
        stack = np.stack(ms).astype(np.int64)
        labelled = (stack != 255).sum(axis=0)
        q = np.stack([(stack == c).sum(axis=0) / labelled for c in range(C)], axis=-1)
        np.save(folder / f"{stem}.npy", q.astype(np.float32))
    return folder


def common(a: dict, b: dict) -> dict:
    return {k: (a[k], b[k]) for k in a if k in b}


def same(x, y) -> bool:
    return (x == y) or (isinstance(x, float) and math.isnan(x) and math.isnan(y))


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 1.7, "log_base": 2.0}, {"eps": 1e-3, "exclude_class": (1,)}],
    ids=["default", "temperature-bits", "eps-exclude"],
)
def test_identical_to_soft_gt_on_the_saved_frequency_map(tmp_path, rng, options):
    pred, dirs, masks = write_set(tmp_path, rng, ignore=0.2)
    soft = frequency_file(tmp_path / "soft", masks)
    raters = evaluate_raters(pred, dirs, **options).summary()
    reference = evaluate(pred, soft, soft_gt=True, **options).summary()
    assert raters["settings"] == reference["settings"] | {"raters": raters["settings"]["raters"]}
    assert raters["n_valid"] == reference["n_valid"]
    pairs = common(reference["dataset"], raters["dataset"])
    assert len(pairs) >= 20
    bad = {k: v for k, v in pairs.items() if not same(*v)}
    assert not bad  # bit for bit, not approximately
    for row_r, row_s in zip(raters["images"], reference["images"]):
        assert all(same(*v) for v in common(row_s, row_r).values())
    for row_r, row_s in zip(raters["classes"], reference["classes"]):
        assert all(same(*v) for v in common(row_s, row_r).values())


def test_pixels_no_rater_labels_are_ignored(tmp_path, rng):
    pred, dirs, masks = write_set(tmp_path, rng, n_images=1, ignore=0.3, all_ignored=0.2)
    result = evaluate_raters(pred, dirs)
    stack = np.stack(masks["img0"])
    labelled = (stack != 255).any(axis=0)
    assert 0 < labelled.sum() < labelled.size
    assert result.summary()["n_valid"] == int(labelled.sum())
    # the same numbers as --soft-gt on the labelled pixels only: cut them out of both maps
    P = np.load(pred / "img0.npy").reshape(-1, C)[labelled.reshape(-1)][None]
    cut = tmp_path / "cut"
    (cut / "pred").mkdir(parents=True)
    np.save(cut / "pred" / "img0.npy", P)
    kept = {"img0": [m.reshape(-1)[labelled.reshape(-1)][None] for m in masks["img0"]]}
    soft = frequency_file(cut / "soft", kept)
    reference = evaluate(cut / "pred", soft, soft_gt=True).summary()["dataset"]
    got = result.summary()["dataset"]
    for key in ("kl_pooled", "ce_pooled", "js_pooled", "brier_pooled", "ece_pooled"):
        assert got[key] == pytest.approx(reference[key], rel=1e-6), key
    assert got["miou_pooled"] == reference["miou_pooled"]


def test_chunk_size_does_not_change_a_number(tmp_path, rng):
    pred, dirs, _ = write_set(tmp_path, rng, ignore=0.2, all_ignored=0.05)
    a = evaluate_raters(pred, dirs).summary()
    b = evaluate_raters(pred, dirs, chunk_pixels=7).summary()
    for key, (x, y) in common(a["dataset"], b["dataset"]).items():
        if isinstance(x, float) and not math.isnan(x):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12), key
    for name in ("soft_dice", "ged", "miou_vs_raters", "rater_pairwise_miou"):
        assert a["dataset"][f"{name}_image_mean"] == b["dataset"][f"{name}_image_mean"]


def test_rater_scores_match_counts_of_the_whole_image(tmp_path, rng):
    """An image's scores are those of RaterStats.from_chunk on all its labelled pixels."""
    pred, dirs, masks = write_set(tmp_path, rng, n_images=1, ignore=0.2, all_ignored=0.1)
    row = evaluate_raters(pred, dirs, chunk_pixels=5).summary()["images"][0]
    codes = np.stack([m.reshape(-1) for m in masks["img0"]]).astype(np.int64)
    codes[codes == 255] = -1
    keep = (codes >= 0).any(axis=0)
    P = np.load(pred / "img0.npy").reshape(-1, C).T[:, keep]
    expected = rater_values(
        RaterStats.from_chunk(P, np.argmax(P, 0), codes[:, keep]), list(range(C))
    )
    for name, value in expected.items():
        assert row[name] == value, name


def test_samples_are_the_argmax_of_each_samples_folder(tmp_path, rng):
    pred, dirs, masks = write_set(tmp_path, rng, n_images=2)
    samples = []
    for k in range(2):
        folder = tmp_path / f"s{k}"
        folder.mkdir()
        for stem in masks:
            np.save(folder / f"{stem}.npy", random_probs(rng, 13 * 17, C).reshape(13, 17, C))
        samples.append(folder)
    with_samples = evaluate_raters(pred, dirs, samples=samples).summary()
    plain = evaluate_raters(pred, dirs).summary()
    assert with_samples["settings"]["raters"]["samples"] == 2
    assert with_samples["dataset"]["ged_pooled"] != plain["dataset"]["ged_pooled"]
    # everything but GED is the same: the samples enter GED only
    for key in ("kl_pooled", "soft_dice_pooled", "miou_vs_raters_image_mean"):
        assert with_samples["dataset"][key] == plain["dataset"][key]


def test_processes_give_the_numbers_of_one_process(tmp_path, rng):
    pred, dirs, _ = write_set(tmp_path, rng, n_images=3, ignore=0.1)
    one = evaluate_raters(pred, dirs, jobs=1).summary()
    two = evaluate_raters(pred, dirs, jobs=2).summary()
    assert all(same(*v) for v in common(one["dataset"], two["dataset"]).values())


# --- bad input ----------------------------------------------------------------------------


def test_rater_folders_with_other_stems_name_the_file(tmp_path, rng):
    pred, dirs, _ = write_set(tmp_path, rng)
    Image.fromarray(np.zeros((13, 17), np.uint8)).save(dirs[1] / "extra.png")
    with pytest.raises(InputError) as err:
        pair_raters(pred, dirs)
    assert err.value.path == str(dirs[1] / "extra.png")
    assert "rater folder" in err.value.message and str(dirs[0]) in err.value.message


def test_rater_masks_of_another_shape_name_the_file(tmp_path, rng):
    pred, dirs, _ = write_set(tmp_path, rng, n_images=1)
    Image.fromarray(np.zeros((13, 16), np.uint8)).save(dirs[2] / "img0.png")
    with pytest.raises(ShapeError) as err:
        evaluate_raters(pred, dirs)
    assert err.value.path == str(dirs[2] / "img0.png")
    assert "(13, 16)" in err.value.message and "(13, 17)" in err.value.message


def test_labels_outside_the_classes_name_the_rater_file(tmp_path, rng):
    pred, dirs, _ = write_set(tmp_path, rng, n_images=1)
    bad = np.zeros((13, 17), np.uint8)
    bad[0, 0] = 9
    Image.fromarray(bad).save(dirs[1] / "img0.png")
    with pytest.raises(LabelError) as err:
        evaluate_raters(pred, dirs)
    assert err.value.path == str(dirs[1] / "img0.png") and "9 (1 px)" in err.value.message


def test_one_rater_or_bad_options_are_usage_errors(tmp_path, rng):
    pred, dirs, _ = write_set(tmp_path, rng, n_images=1)
    with pytest.raises(UsageError, match="at least two"):
        evaluate_raters(pred, dirs[:1])
    with pytest.raises(UsageError, match="--soft-gt"):
        evaluate_raters(pred, dirs, soft_gt=True)
    with pytest.raises(UsageError, match="--smoothing"):
        evaluate_raters(pred, dirs, smoothing=0.1)


def test_masks_are_read_once_and_banded(tmp_path, rng):
    """The band of rows [r0, r1) is the band of its pixels; q sums to 1 where labelled."""
    from klseg_cli.core.labels import LabelSpec

    _, dirs, _ = write_set(tmp_path, rng, n_images=1, ignore=0.3, all_ignored=0.1)
    masks = RaterMasks([d / "img0.png" for d in dirs], LabelSpec(C, (255,)))
    band = masks.rows(2, 5)
    assert band.q.shape == (C, 3 * 17) and band.q.dtype == np.float32
    same_band = masks.band(2 * 17, 5 * 17)
    np.testing.assert_array_equal(band.q, same_band.q)
    labelled = band.valid if band.valid is not None else np.ones(band.q.shape[1], bool)
    np.testing.assert_allclose(band.q[:, labelled].sum(axis=0), 1.0, rtol=1e-6)
    assert not band.q[:, ~labelled].any()


def test_the_api_gives_the_numbers_of_the_folder_evaluation(tmp_path, rng):
    """RaterEvaluator on the arrays == evaluate_raters on the files, number for number."""
    from klseg_cli.commands.rater_evaluator import RaterEvaluator

    pred, dirs, masks = write_set(tmp_path, rng, ignore=0.2, all_ignored=0.05)
    samples = tmp_path / "s0"
    samples.mkdir()
    for stem in masks:
        np.save(samples / f"{stem}.npy", random_probs(rng, 13 * 17, C).reshape(13, 17, C))
    files = evaluate_raters(pred, dirs, samples=[samples]).summary()
    ev = RaterEvaluator(C)
    for stem in sorted(masks):
        chw = np.load(pred / f"{stem}.npy").transpose(2, 0, 1)  # another layout, same map
        ev.update_raters(chw, np.stack(masks[stem]), stems=stem,
                         samples=np.load(samples / f"{stem}.npy")[None])  # fmt: skip
    half = RaterEvaluator(C)
    api = ev.compute()
    assert all(same(*v) for v in common(files["dataset"], api["dataset"]).values())
    assert set(files["dataset"]) <= set(api["dataset"])
    for row_f, row_a in zip(files["images"], api["images"]):
        assert all(same(*v) for v in common(row_f, row_a).values())
    assert [r["soft_dice"] for r in api["classes"]] == [r["soft_dice"] for r in files["classes"]]
    # merged accumulators: the same numbers
    other = RaterEvaluator(C)
    for k, stem in enumerate(sorted(masks)):
        target = half if k % 2 else other
        target.update_raters(np.load(pred / f"{stem}.npy"), np.stack(masks[stem]), stems=stem,
                             samples=np.load(samples / f"{stem}.npy")[None])  # fmt: skip
    merged = other.merge(half).compute()
    assert all(same(*v) for v in common(api["dataset"], merged["dataset"]).values())


def test_the_api_refuses_one_rater_and_plain_update():
    from klseg_cli.commands.rater_evaluator import RaterEvaluator

    ev = RaterEvaluator(C)
    with pytest.raises(ShapeError, match="R ≥ 2"):
        ev.update_raters(np.full((5, 5, C), 1 / C, np.float32), np.zeros((1, 5, 5), np.uint8))
    with pytest.raises(UsageError, match="update_raters"):
        ev.update(np.full((5, 5, C), 1 / C, np.float32), np.zeros((5, 5), np.uint8))
    bad = np.zeros((2, 5, 5), np.uint8)
    bad[1, 0, 0] = 9
    with pytest.raises(LabelError, match="rater 1"):
        ev.update_raters(np.full((5, 5, C), 1 / C, np.float32), bad, stems="x")


def test_dask_gives_the_numbers_of_one_process(tmp_path, rng, monkeypatch):
    """--scheduler local:2 with --rater: the same summary as a local run; a bad mask is the
    same one-line error naming the file as given (relative here)."""
    pytest.importorskip("distributed")
    from klseg_cli.engine.raters import dask_evaluate_raters

    _, dirs, masks = write_set(tmp_path, rng, n_images=3, ignore=0.1, all_ignored=0.05)
    samples = tmp_path / "s0"
    samples.mkdir()
    for stem in masks:
        np.save(samples / f"{stem}.npy", random_probs(rng, 13 * 17, C).reshape(13, 17, C))
    monkeypatch.chdir(tmp_path)
    rel = [d.name for d in dirs]
    local = evaluate_raters("pred", rel, samples=["s0"]).summary()
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(dirs[1] / "img2.png")
    result = dask_evaluate_raters("pred", rel, samples=["s0"], scheduler="local:2",
                                  keep_going=True)  # fmt: skip
    assert result.errors == [{
        "file": "r1/img2.png",
        "message": "shape (3, 3) does not match the first rater's r0/img2.png (13, 17)",
    }]  # fmt: skip
    remote = result.summary()
    assert remote["n_images"] == 2
    first_two = evaluate_raters("pred", rel, samples=["s0"], keep_going=True).summary()
    assert all(same(*v) for v in common(first_two["dataset"], remote["dataset"]).values())
    assert local["n_images"] == 3
