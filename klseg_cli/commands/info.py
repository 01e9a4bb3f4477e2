"""``klseg info``: what a file holds and whether klseg can use it, chunk by chunk."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.chunks import chunk_for
from ..errors import KlsegError
from ..io.labelio import WHOLE_LABEL_BYTES, LabelBands
from ..io.readers import (
    DEFAULT_MAX_PIXELS,
    PredictionMap,
    TiffSegments,
    detect_layout,
    load_array,
    prediction_map,
    read_target,
    sum_tolerance,
)

_INFO_CHUNK = 1 << 16


def _label_facts(labels) -> dict:
    """Label values and their pixel counts, counted band by band (a large mask is a
    ``LabelBands``, never read whole)."""
    flat, by_value = labels.reshape(-1), {}
    for start in range(0, flat.size, 1 << 20):
        part = np.asarray(flat[start : start + (1 << 20)])
        for v, c in zip(*(a.tolist() for a in np.unique(part, return_counts=True))):
            by_value[v] = by_value.get(v, 0) + c
    values, counts = np.array(sorted(by_value)), np.array([by_value[v] for v in sorted(by_value)])
    shown = ", ".join(f"{v}: {c}" for v, c in zip(values[:20].tolist(), counts[:20].tolist()))
    if len(values) > 20:
        shown += f", … ({len(values)} values)"
    return {"kind": "label mask", "labels (value: pixels)": shown}


def _map_facts(pm: PredictionMap) -> dict:
    lo, hi, n_nonfinite = math.inf, -math.inf, 0
    s_lo, s_hi, n_off = math.inf, -math.inf, 0
    tol = sum_tolerance(pm.array.dtype)
    step = chunk_for(_INFO_CHUNK, pm.num_classes)
    for start in range(0, pm.n_pixels, step):
        P = pm.block(start, min(start + step, pm.n_pixels))
        finite = np.isfinite(P)
        if not finite.all():
            n_nonfinite += int(P.size - np.count_nonzero(finite))
            P = np.where(finite, P, 0)
        lo, hi = min(lo, float(P.min())), max(hi, float(P.max()))
        sums = P.sum(axis=0, dtype=np.float64)
        s_lo, s_hi = min(s_lo, float(sums.min())), max(s_hi, float(sums.max()))
        n_off += int(np.count_nonzero(np.abs(sums - 1.0) > tol))
    if n_nonfinite:
        verdict = f"{n_nonfinite} NaN/Inf values: not usable"
    elif lo < 0 or hi > 1 + tol:
        verdict = "values outside [0, 1]: looks like logits (use --input logits)"
    elif n_off:
        verdict = f"{n_off} pixels do not sum to 1 within {tol:g}: not normalised"
    else:
        verdict = f"probabilities: every pixel sums to 1 within {tol:g}"
    facts = {
        "kind": "probability map" if pm.layout != "hw" else "binary map (P(class 1))",
        "classes": pm.num_classes,
        "height x width": f"{pm.height} x {pm.width}",
        "value range": f"[{lo:.6g}, {hi:.6g}]",
    }
    if pm.layout != "hw":
        facts["pixel sums"] = f"[{s_lo:.6g}, {s_hi:.6g}]"
    facts["verdict"] = verdict
    return facts


def _read_as(arr) -> str:
    if isinstance(arr, np.memmap):
        return "from the file, a chunk at a time"
    if isinstance(arr, TiffSegments):
        return f"tiles, {arr.band_height} rows at a time"
    if type(arr).__name__ == "ZarrSource":
        return "Zarr chunks, one band of chunk rows at a time"
    return "whole, into memory"


def inspect_file(
    path: Path,
    *,
    target: Path | None = None,
    layout: str | None = None,
    num_classes: int | None = None,
    npz_key: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float | None = None,
    strict_zarr: bool = False,
) -> dict:
    """Facts about one prediction map or target mask (a path or URL), as display strings.

    ``timeout`` and ``strict_zarr`` as for ``evaluation.plan``."""
    from ..io import network, zarrio
    from ..io.remote import as_input

    network.use(network.settings_for(timeout))
    zarrio.use_strict(strict_zarr)
    path, target = as_input(path), as_input(target)
    with zarrio.collect_missing() as missing:
        facts = _inspect(path, target=target, layout=layout, num_classes=num_classes,
                         npz_key=npz_key, max_pixels=max_pixels)  # fmt: skip
    zarrio.warn_missing(missing)
    return facts


def _inspect(path, *, target, layout, num_classes, npz_key, max_pixels) -> dict:
    from ..io.volumes import is_nifti

    if is_nifti(path):  # a volume (volumes.py)
        from ..io.volumes import nifti_facts

        return nifti_facts(path, max_pixels=max_pixels, map_facts=_map_facts,
                           label_facts=_label_facts)  # fmt: skip
    if path.suffix.lower() == ".png":
        labels = read_target(path, max_pixels=max_pixels)
        return {
            "format": "png",
            "shape": tuple(labels.shape),
            "dtype": str(labels.dtype),
            "read as": "whole, into memory (a PNG label mask is always decoded whole)",
            **_label_facts(labels),
        }
    arr = load_array(path, npz_key=npz_key, max_pixels=max_pixels)
    facts: dict = {
        "format": path.suffix.lower().lstrip("."),
        "shape": tuple(arr.shape),
        "dtype": str(arr.dtype),
        "read as": _read_as(arr),
    }
    if arr.dtype.kind in "iub" and arr.ndim == 2:  # read as a target
        labels = read_target(path, max_pixels=max_pixels)
        facts["read as"] = (
            f"in row bands (a label mask over {WHOLE_LABEL_BYTES >> 20} MiB: never whole)"
            if isinstance(labels, LabelBands)
            else "whole, into memory (a label mask)"
        )
        return {**facts, **_label_facts(labels)}
    if arr.dtype.kind != "f":
        facts["verdict"] = f"{arr.dtype} values: neither a label mask nor a probability map"
        return facts
    hw = tuple(read_target(target, max_pixels=max_pixels).shape) if target is not None else None
    try:
        found = detect_layout(arr.shape, hw, layout=layout, num_classes=num_classes, path=path)
    except KlsegError as err:
        facts["layout"] = err.message
        return facts
    facts["layout"] = {"hwc": "HWC", "chw": "CHW", "hw": "HW (binary)"}[found]
    return {**facts, **_map_facts(prediction_map(path, arr, found))}
