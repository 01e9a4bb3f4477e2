"""Open a pair's files: the prediction as a ``PredictionMap`` and its target (labels or a
soft target), checked to fit each other; volumes go to ``volumes.py``."""

from __future__ import annotations

import numpy as np

from ..core.results import ReadOptions
from ..errors import InputError, ShapeError, UsageError
from .pairing import OpenedPair, Pair
from .readers import PredictionMap, load_array, open_prediction, read_target


def use_read_options(read: ReadOptions) -> None:
    """Make a run's network bounds and Zarr strictness this process's: the client calls it
    before it lists and opens anything, a worker (process or Dask) before its task reads."""
    from . import network, zarrio

    network.use(read.network)
    zarrio.use_strict(read.strict_zarr)


def open_pair(
    pair: Pair, *, soft_gt: bool, num_classes: int | None, read: ReadOptions
) -> OpenedPair:
    """Open a prediction and its target, check that they fit, and find the layout."""
    from .volumes import is_volume_pair

    if is_volume_pair(pair, read):
        from .volumes import open_volume_pair

        return open_volume_pair(pair, soft_gt=soft_gt, num_classes=num_classes, read=read)
    kw = dict(npz_key=read.npz_key, max_pixels=read.max_pixels)
    target: np.ndarray | PredictionMap | None = None
    hw = None
    if pair.target is not None:
        _refuse_swapped(pair, read=read)
        if soft_gt:
            hw = soft_target_hw(pair, num_classes=num_classes, read=read)
            target = open_prediction(
                pair.target, hw=hw, layout=read.layout, num_classes=num_classes, **kw
            )
            if target.layout == "hw":
                raise ShapeError("a soft target must be (H, W, C) or (C, H, W)", path=pair.target)
        else:
            target = read_target(pair.target, max_pixels=read.max_pixels)
            hw = target.shape
    pred = open_prediction(pair.pred, hw=hw, layout=read.layout, num_classes=num_classes, **kw)
    if num_classes is not None and pred.num_classes != num_classes:
        raise ShapeError(
            f"has {pred.num_classes} classes ({pred.layout.upper()} shape "
            f"{tuple(pred.array.shape)}), expected {num_classes} (the classes given or found "
            "first: check --classes)",
            path=pair.pred,
        )
    if isinstance(target, PredictionMap) and target.num_classes != pred.num_classes:
        raise ShapeError(
            f"soft target has {target.num_classes} classes, prediction {pred.num_classes}",
            path=pair.target,
        )
    return OpenedPair(pred, target, pred.height, pred.width)


def _refuse_swapped(pair: Pair, *, read: ReadOptions) -> None:
    """A usage error when PRED holds integer labels and GT floats (arguments swapped).

    Only headers are read (``.npy`` and TIFF are memory-mapped or opened lazily); ``.npz``
    predictions are not looked into, their own errors say enough.
    """
    suffix = pair.pred.suffix.lower()
    if suffix == ".npz" or pair.target.suffix.lower() == ".npz":
        return
    try:
        labels = (
            suffix == ".png"
            or load_array(pair.pred, max_pixels=read.max_pixels).dtype.kind in "iub"
        )
        if labels and load_array(pair.target, max_pixels=read.max_pixels).dtype.kind == "f":
            raise UsageError(
                f"PRED and GT look swapped: {pair.pred} holds integer labels and "
                f"{pair.target} floats; pass the prediction maps first, then the targets"
            )
    except InputError:
        return  # the file's own error is reported when it is opened


def soft_target_hw(
    pair: Pair, *, num_classes: int | None, read: ReadOptions
) -> tuple[int, int] | None:
    """The (H, W) of a soft target, from its shape and the prediction's (either may be HWC
    or CHW): the (H, W) both shapes share; when both ends fit, the class count, and else
    the axis along which the target's values sum to 1."""
    kw = dict(npz_key=read.npz_key, max_pixels=read.max_pixels)
    try:
        t_arr = load_array(pair.target, **kw)
        p_shape = tuple(load_array(pair.pred, **kw).shape)
    except InputError:
        return None  # reported when the file is opened
    t_shape = tuple(t_arr.shape)
    if len(t_shape) != 3 or len(p_shape) not in (2, 3) or read.layout is not None:
        return None
    if len(p_shape) == 2:
        return p_shape if p_shape in (t_shape[:2], t_shape[1:]) else None
    candidates = [hw for hw in (t_shape[:2], t_shape[1:]) if hw in (p_shape[:2], p_shape[1:])]
    if len(set(candidates)) == 1:
        return candidates[0]
    if num_classes is not None:
        fits = [hw for hw, c in ((t_shape[:2], t_shape[2]), (t_shape[1:], t_shape[0]))
                if c == num_classes]  # fmt: skip
        if len(fits) == 1:
            return fits[0]
    sums_last = np.asarray(t_arr[:2, :2, :], dtype=np.float64).sum(axis=-1)
    sums_first = np.asarray(t_arr[:, :2, :2], dtype=np.float64).sum(axis=0)
    last, first = np.allclose(sums_last, 1, atol=1e-2), np.allclose(sums_first, 1, atol=1e-2)
    if last != first:
        return t_shape[:2] if last else t_shape[1:]
    return None  # detect_layout explains the ambiguity
