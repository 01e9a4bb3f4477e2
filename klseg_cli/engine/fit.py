"""The temperature fit's passes over files (``klseg calibrate``): each pair opened and read
chunk by chunk, through the compiled pass (``core/_fast_fit``) where the evaluation kernel
would take the map, else through NumPy. The maths is ``core/calibration``'s."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..core.calibration import (
    SAMPLE_BLOCK,
    SAMPLE_PIXELS,
    ChunkData,
    _numpy_sample,
    chunk_objective,
    log_ptilde,
    target_terms,
)
from ..core.calibration_views import class_codes
from ..core.metrics import MetricSettings
from ..errors import KlsegError, UsageError


def iter_fit_chunks(pairs, settings: MetricSettings, read) -> Iterator:
    """(log p̃, Σq log p̃, Σq log q) of every chunk of every pair's valid pixels: one pass."""
    for pair in pairs:
        opened = _open(pair, settings, read)
        yield from _numpy_chunks(pair, opened, settings, read)


def _open(pair, settings: MetricSettings, read):
    from ..io.opening import open_pair

    opened = open_pair(pair, soft_gt=settings.soft_gt, num_classes=settings.num_classes,
                       read=read)  # fmt: skip
    if opened.target is None:
        raise UsageError(f"{pair.pred}: calibration needs a target")
    return opened


def _numpy_chunks(pair, opened, settings: MetricSettings, read) -> Iterator:
    from .image import _tolerance, iter_chunks

    tolerance = _tolerance(opened.pred, settings)
    for _, _, _, P, tgt in iter_chunks(
        opened.pred, opened.target, settings, chunk_pixels=read.chunk_pixels,
        target_path=pair.target,
    ):  # fmt: skip
        try:
            L = log_ptilde(P, settings, tolerance)
        except KlsegError as err:
            raise err.with_path(pair.pred) from None
        qL, neg_h = target_terms(L, tgt, settings)
        yield L, qL, neg_h


@dataclass
class PairData:
    """``FitData`` over the files of ``pairs``: the compiled pass (``_fast_fit``) for the
    maps the evaluation kernel would take, the NumPy pass for the rest."""

    pairs: list
    settings: MetricSettings
    read: object  # evaluation.ReadOptions
    n_pixels: int = 0  # of all predictions, from their headers: spreads the sample

    def pass_at(self, a: float):
        from .image import uses_kernel

        n = 0
        neg_h = f = g = h = 0.0
        for pair in self.pairs:
            opened = _open(pair, self.settings, self.read)
            if _labels(opened.target) and uses_kernel(
                opened.pred, self.settings, self.read.accelerate
            ):
                r = _kernel_pass(pair, opened, self.settings, self.read, a)
            else:
                chunks = _numpy_chunks(pair, opened, self.settings, self.read)
                r = ChunkData(lambda chunks=chunks: chunks).pass_at(a)
            n += r[0]
            neg_h, f, g, h = neg_h + r[1], f + r[2], g + r[3], h + r[4]
        return n, neg_h, f, g, h

    def sample(self):
        """Pixels spread evenly over the images (or over every k-th image when there are
        many), read in blocks: whole small images are read in order and thinned. Values are
        not checked here — the passes check every one."""
        from ..core import _fast_fit
        from ..core.chunks import chunk_for

        settings, read = self.settings, self.read
        budget = max(SAMPLE_BLOCK, min(SAMPLE_PIXELS, (1 << 22) // settings.num_classes))
        total = max(self.n_pixels, 1)
        block = max(256, min(SAMPLE_BLOCK, budget // max(len(self.pairs), 1)))
        every = max(1, -(-len(self.pairs) * block // budget))
        raw, parts, kernel = [], [], True
        logits = settings.input_kind == "logits"
        for pair in self.pairs[::every]:
            try:
                opened = _open(pair, settings, read)
            except KlsegError:  # the passes report it
                continue
            pred, target = opened.pred, opened.target
            kernel = kernel and _labels(target) and _fast_fit.supported(
                settings, pred.compute_dtype)  # fmt: skip
            npx = pred.n_pixels
            want = max(1, round(budget * npx / total * every))
            if want * 4 >= npx:  # a small image: read it in order, keep every k-th pixel
                step = chunk_for(read.chunk_pixels, pred.num_classes)
                starts, thin = range(0, npx, step), max(1, npx // want)
            else:
                step = chunk_for(block, pred.num_classes)
                k = max(1, want // step)
                starts, thin = np.linspace(0, npx - step, k).astype(np.int64).tolist(), 1
            for start in starts:
                stop = min(start + step, npx)
                with np.errstate(all="ignore"):
                    P = pred.block(start, stop, logits=logits)[:, ::thin]
                    if _labels(target):
                        y = class_codes(target.reshape(-1)[start:stop][::thin], settings)
                        keep = y >= 0
                        P, tgt = P[:, keep], y[keep]
                    else:
                        tgt = target.block(start, stop)[:, ::thin]
                    raw.append((np.ascontiguousarray(P, dtype=np.float32), tgt))
        if not raw:
            return None
        if kernel:  # the compiled pass on the sample's probabilities and labels
            Ps = np.concatenate([r[0] for r in raw], axis=1)
            ys = np.concatenate([r[1] for r in raw])

            def evaluate(a: float) -> tuple[float, float]:
                ok, _, _, g, h = _fast_fit.chunk_sums(Ps, ys, a, settings, 1e30)
                return (g, h) if ok else (math.nan, math.nan)

            return evaluate
        for P, tgt in raw:
            with np.errstate(all="ignore"):
                L = log_ptilde(P, settings, None)
                qL, _ = target_terms(L, tgt, settings)
            ok = np.isfinite(qL)
            parts.append((L[:, ok], qL[ok]))
        return _numpy_sample(parts)


def _labels(target) -> bool:
    """Whether a target is a label mask (an array, or one read in row bands), not a soft
    target map (which is read with ``block``)."""
    return target is not None and not hasattr(target, "block")


def _kernel_pass(pair, opened, settings, read, a):
    """One pair through the compiled pass; a chunk it refuses goes through NumPy (which
    raises the error, or computes it when the bad values are all under ignored pixels)."""
    from ..core import _fast_fit
    from ..core.chunks import chunk_for
    from .image import _tolerance

    pred = opened.pred
    labels = opened.target.reshape(-1)
    settings.labels.check(labels, pair.target)
    tolerance = _tolerance(pred, settings)
    step = chunk_for(read.chunk_pixels, pred.num_classes)
    planes = pred.planes_in_memory()
    pixel_major = pred.layout == "hwc"
    n = 0
    f = g = h = 0.0
    for start in range(0, pred.n_pixels, step):
        stop = min(start + step, pred.n_pixels)
        y = class_codes(labels[start:stop], settings)
        if planes is not None:
            ok, k, df, dg, dh = _fast_fit.chunk_sums(planes, y, a, settings, tolerance,
                                                     start=start)  # fmt: skip
            P = planes[:, start:stop]
        else:
            P = pred.pixel_rows(start, stop) if pixel_major else pred.block(start, stop)
            ok, k, df, dg, dh = _fast_fit.chunk_sums(P, y, a, settings, tolerance,
                                                     pixel_major=pixel_major)  # fmt: skip
            if pixel_major:
                P = P.T
        if not ok:  # the NumPy path diagnoses the chunk (or computes it)
            idx = np.flatnonzero(y >= 0)
            try:
                L = log_ptilde(np.ascontiguousarray(P[:, idx]), settings, tolerance)
            except KlsegError as err:
                raise err.with_path(pair.pred) from None
            qL, _ = target_terms(L, y[idx], settings)
            k = idx.size
            df, dg, dh = chunk_objective(L, qL, a)
        n += k
        f, g, h = f + df, g + dg, h + dh
    return n, 0.0, f, g, h
