"""3-D volumes: NIfTI and .npy with --spatial-dims 3 give the numbers of the same voxels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from klseg_cli.cli.root import app
from klseg_cli.core import boundary as bd
from klseg_cli.engine.local import evaluate

nib = pytest.importorskip("nibabel")

SHAPE = (14, 12, 9)  # X, Y, Z
SPACING = (0.8, 0.9, 2.5)
C = 3


def _affine():
    """A non-identity affine: spacing, a rotation about z, a translation."""
    t = math.radians(20)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(SPACING)
    aff[:3, 3] = [12.0, -40.0, 7.5]
    return aff


def _volume(seed: int):
    """Probabilities (X, Y, Z, C) float32 and labels (X, Y, Z) uint8 of a small scene."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:10, 2:8, 2:7] = 1
    labels[8:13, 6:11, 1:5] = 2
    labels[0, 0, :] = 255
    logits = rng.normal(size=(*SHAPE, C)).astype(np.float32)
    onehot = np.eye(C, dtype=np.float32)[np.where(labels == 255, 0, labels)]
    logits += 2.0 * onehot
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32), labels


def _write(tmp_path, seeds=(0, 1), *, nifti=True, gz=False, class_first=False, fortran=False):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(parents=True, exist_ok=True)
    gt.mkdir(parents=True, exist_ok=True)
    for k, seed in enumerate(seeds):
        p, labels = _volume(seed)
        stem = f"case_{k:02d}"
        if nifti:
            ext = ".nii.gz" if gz else ".nii"
            nib.save(nib.Nifti1Image(p, _affine()), pred / f"{stem}{ext}")
            nib.save(nib.Nifti1Image(labels, _affine()), gt / f"{stem}{ext}")
        else:
            arr = np.moveaxis(p, -1, 0) if class_first else p
            np.save(pred / f"{stem}.npy", np.asfortranarray(arr) if fortran else arr)
            np.save(gt / f"{stem}.npy", labels)
    return pred, gt


def _same(a: dict, b: dict, rel=1e-9):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            if math.isnan(a[key]):
                assert math.isnan(b[key]), key
            else:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-12), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_equals_npy_with_spacing(tmp_path, gz):
    opts_n = bd.BoundaryOptions()
    opts_s = bd.BoundaryOptions(spacing=SPACING)
    n_pred, n_gt = _write(tmp_path / "n", nifti=True, gz=gz)
    s_pred, s_gt = _write(tmp_path / "s", nifti=False)
    a = evaluate(n_pred, n_gt, boundary=opts_n, jobs=1).summary()
    b = evaluate(s_pred, s_gt, boundary=opts_s, jobs=1, spatial_dims=3).summary()
    for ra, rb in zip(a["images"], b["images"]):
        _same(ra, rb, rel=1e-6)
        assert (ra["height"], ra["width"], ra["depth"]) == SHAPE
    for ca, cb in zip(a["classes"], b["classes"]):
        _same(ca, cb, rel=1e-6)
    _same(a["dataset"], b["dataset"], rel=1e-6)
    assert a["dataset"]["hd95_image_mean"] > 0


def test_npy_volume_metrics_are_per_voxel(tmp_path):
    """A volume's per-voxel metrics equal those of its voxels laid out as one 2-D image."""
    pred, gt = _write(tmp_path / "v", seeds=(3,), nifti=False)
    flat = tmp_path / "f"
    (flat / "pred").mkdir(parents=True)
    (flat / "gt").mkdir()
    p, labels = _volume(3)
    np.save(flat / "pred" / "case_00.npy", p.reshape(SHAPE[0] * SHAPE[1], SHAPE[2], C))
    np.save(flat / "gt" / "case_00.npy", labels.reshape(SHAPE[0] * SHAPE[1], SHAPE[2]))
    a = evaluate(pred, gt, spatial_dims=3, jobs=1).summary()
    b = evaluate(flat / "pred", flat / "gt", jobs=1).summary()
    _same(a["dataset"], b["dataset"])
    for ca, cb in zip(a["classes"], b["classes"]):
        _same(ca, cb)


@pytest.mark.parametrize("class_first,fortran", [(True, False), (False, True), (True, True)])
def test_npy_layouts(tmp_path, class_first, fortran):
    opts = bd.BoundaryOptions(spacing=SPACING)
    base = evaluate(*_write(tmp_path / "b", nifti=False), boundary=opts, spatial_dims=3, jobs=1)
    other = evaluate(
        *_write(tmp_path / "o", nifti=False, class_first=class_first, fortran=fortran),
        boundary=opts, spatial_dims=3, jobs=1,
    )  # fmt: skip
    _same(base.summary()["dataset"], other.summary()["dataset"], rel=1e-6)


def test_boundary_of_volume_matches_direct_computation(tmp_path):
    pred, gt = _write(tmp_path, seeds=(5,), nifti=True)
    result = evaluate(pred, gt, boundary=bd.BoundaryOptions(nsd_tolerance=1.0), jobs=1)
    p, labels = _volume(5)
    argmax = np.argmax(p, axis=-1)
    valid = labels != 255
    rows = result.image_class_rows()
    width = bd.width_for(bd.BoundaryOptions(), SHAPE, SPACING)
    for c in range(C):
        want = bd.class_metrics(
            labels == c, (argmax == c) & valid, SPACING, tolerance=1.0, width=width
        )
        assert tuple(rows[c][m] for m in bd.BOUNDARY_METRICS) == pytest.approx(want, rel=1e-6)


def test_affine_mismatch_is_an_error(tmp_path):
    pred, gt = _write(tmp_path, seeds=(0,), nifti=True)
    _, labels = _volume(0)
    shifted = _affine()
    shifted[0, 3] += 3.0
    nib.save(nib.Nifti1Image(labels, shifted), gt / "case_00.nii")
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt)])
    assert res.exit_code == 2
    assert "affine differs" in res.output and "--allow-affine-mismatch" in res.output
    ok = CliRunner().invoke(app, ["evaluate", str(pred), str(gt), "--allow-affine-mismatch"])
    assert ok.exit_code == 0, ok.output


def test_spacing_mismatch_is_an_error(tmp_path):
    pred, gt = _write(tmp_path, seeds=(0,), nifti=True)
    _, labels = _volume(0)
    img = nib.Nifti1Image(labels, np.diag([1.0, 1.0, 1.0, 1.0]))
    nib.save(img, gt / "case_00.nii")
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt)])
    assert res.exit_code == 2
    assert "voxel spacing (0.8, 0.9, 2.5) differs" in res.output


def test_float_labels_and_bad_labels(tmp_path):
    pred, gt = _write(tmp_path, seeds=(0,), nifti=True)
    _, labels = _volume(0)
    nib.save(nib.Nifti1Image(labels.astype(np.float32), _affine()), gt / "case_00.nii")
    assert CliRunner().invoke(app, ["evaluate", str(pred), str(gt)]).exit_code == 0
    bad = labels.astype(np.float32)
    bad[1, 1, 1] = 0.5
    nib.save(nib.Nifti1Image(bad, _affine()), gt / "case_00.nii")
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt)])
    assert res.exit_code == 2 and "non-integer" in res.output


def test_shape_mismatch_and_missing_spatial_dims(tmp_path):
    pred, gt = _write(tmp_path / "a", seeds=(0,), nifti=False)
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt)])
    assert res.exit_code == 2  # a 3-D label .npy is not an image without --spatial-dims 3
    np.save(gt / "case_00.npy", np.zeros((5, 5, 5), dtype=np.uint8))
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt), "--spatial-dims", "3"])
    assert res.exit_code == 2 and "does not match the target volume" in res.output


def test_missing_nibabel_names_the_extra(tmp_path, monkeypatch):
    import builtins

    pred, gt = _write(tmp_path, seeds=(0,), nifti=True)
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "nibabel":
            raise ImportError("no nibabel")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    res = CliRunner().invoke(app, ["evaluate", str(pred), str(gt)])
    assert res.exit_code == 2
    assert "klseg[medical]" in res.output


def test_cli_volume_report(tmp_path):
    pred, gt = _write(tmp_path, nifti=True, gz=True)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["evaluate", str(pred), str(gt), "--boundary", "--exclude-class", "0", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    lines = (out / "per_image.csv").read_text().splitlines()
    assert lines[0].endswith("depth,hd95,assd,nsd,biou")
    assert lines[1].startswith("case_00,14,12,")


def test_jobs_give_the_same_numbers(tmp_path):
    pred, gt = _write(tmp_path, seeds=(0, 1, 2), nifti=True, gz=True)
    opts = bd.BoundaryOptions()
    one = evaluate(pred, gt, boundary=opts, jobs=1).summary()
    two = evaluate(pred, gt, boundary=opts, jobs=2).summary()
    _same(one["dataset"], two["dataset"])


@pytest.mark.parametrize("axis,index", [("z", 4), ("x", 3), ("y", 0)])
def test_heatmap_slice_equals_the_2d_slice(tmp_path, axis, index):
    import tifffile

    pred, gt = _write(tmp_path / "v", seeds=(0,), nifti=True)
    p, labels = _volume(0)
    a = "xyz".index(axis)
    flat = tmp_path / "f"
    flat.mkdir()
    np.save(flat / "p.npy", np.ascontiguousarray(np.take(p, index, axis=a)))
    np.save(flat / "g.npy", np.ascontiguousarray(np.take(labels, index, axis=a)))
    runner = CliRunner()
    res = runner.invoke(app, ["heatmap", str(pred / "case_00.nii"), str(gt / "case_00.nii"),
                              "-o", str(tmp_path / "v.png"), "--raw", str(tmp_path / "v.tif"),
                              "--slice", f"{axis}={index}", "--panel"])  # fmt: skip
    assert res.exit_code == 0, res.output
    args = ["heatmap", str(flat / "p.npy"), str(flat / "g.npy"), "-o", str(tmp_path / "f.png")]
    res = runner.invoke(app, [*args, "--raw", str(tmp_path / "f.tif")])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "v.tif"), tifffile.imread(tmp_path / "f.tif")
    )


def test_heatmap_montage_and_bad_slice(tmp_path):
    import tifffile

    pred, gt = _write(tmp_path, seeds=(0,), nifti=True)
    args = ["heatmap", str(pred / "case_00.nii"), str(gt / "case_00.nii"), "-o"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "m.png"), "--montage", "4",
                                   "--raw", str(tmp_path / "m.tif"), "--colorbar"])  # fmt: skip
    assert res.exit_code == 0, res.output
    tiled = tifffile.imread(tmp_path / "m.tif")
    assert tiled.shape == (2 * SHAPE[0] + 2, 2 * SHAPE[1] + 2)  # 2 × 2 slices, 2-pixel gaps
    assert np.isnan(tiled[SHAPE[0]]).all()
    res = CliRunner().invoke(app, [*args, str(tmp_path / "b.png"), "--slice", "z=99"])
    assert res.exit_code == 2 and "outside the volume (0..8 along z)" in res.output
    res = CliRunner().invoke(app, [*args, str(tmp_path / "b.png"), "--slice", "q=1"])
    assert res.exit_code == 2 and "--slice must look like z=40" in res.output


def test_info_on_nifti(tmp_path):
    pred, gt = _write(tmp_path, seeds=(0,), nifti=True)
    res = CliRunner().invoke(app, ["info", str(pred / "case_00.nii")])
    assert res.exit_code == 0, res.output
    assert "(14, 12, 9, 3)" in res.output and "every pixel sums to 1" in res.output
    res = CliRunner().invoke(app, ["info", str(gt / "case_00.nii")])
    assert res.exit_code == 0, res.output
    assert "label mask" in res.output and "(0.8, 0.9, 2.5)" in res.output


def test_nifti_prediction_with_npy_labels(tmp_path):
    """Mixed formats: the target follows the prediction's axis order."""
    pred, gt = _write(tmp_path / "n", seeds=(0,), nifti=True)
    _, labels = _volume(0)
    mixed = tmp_path / "m"
    mixed.mkdir()
    np.save(mixed / "case_00.npy", labels)
    opts = bd.BoundaryOptions()
    a = evaluate(pred, gt, boundary=opts, jobs=1).summary()
    b = evaluate(pred, mixed, boundary=opts, jobs=1).summary()
    _same(a["dataset"], b["dataset"])
    _same(a["images"][0], b["images"][0])
