"""Several raters' label masks of one image (``klseg evaluate PRED --rater A --rater B``).

Rater folders pair with the predictions by stem, as GT does, and must all hold the same
stems and, per stem, masks of one shape. Each mask is opened as a single label target is
(``readers.read_target``): up to ``labelio.WHOLE_LABEL_BYTES`` read whole, larger ``.npy``,
TIFF and Zarr masks as a ``labelio.LabelBands`` read in row bands as the chunks reach them
(PNG masks are always decoded whole). ``RaterMasks.band`` turns a range of pixels (a row
band, or any chunk in row-major order) into the raters' class codes and their frequency
map q (C, n) float32 for that range only, so memory holds, per rater, its mask (small) or
one band of it (large), and one chunk of q: it does not grow with the image for
npy/TIFF/Zarr masks, and there is never a stack of one-hot maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, ShapeError, UsageError
from .pairing import _ext, _index, _kind, _strip
from .readers import DEFAULT_MAX_PIXELS, PRED_SUFFIXES, TARGET_SUFFIXES, read_target


@dataclass(frozen=True)
class RaterPair:
    """One image: its prediction, each rater's mask (in --rater order), each sample map."""

    stem: str
    pred: Path
    raters: tuple[Path, ...]
    samples: tuple[Path, ...] = ()


@dataclass
class RaterPairing:
    pairs: list[RaterPair]
    missing_pred: list[Path] = field(default_factory=list)  # rater stems without a prediction
    missing_target: list[Path] = field(default_factory=list)  # predictions without raters


def _stem(path: Path, suffix: str) -> str:
    return _strip(path.name[: -len(_ext(path))] if _ext(path) else path.name, suffix)


def pair_raters(
    pred: Path,
    raters: Sequence[Path],
    samples: Sequence[Path] = (),
    *,
    pred_suffix: str = "",
    gt_suffix: str = "",
) -> RaterPairing:
    """Pair predictions with the raters' masks (and the sample maps) by stem.

    Two or more rater folders (or files, when PRED is a file). Every rater folder must
    hold the same stems: a stem one rater lacks is an InputError naming the file that has
    it. ``samples``: prediction folders (files) whose argmax maps are the model's samples;
    each must hold a map for every evaluated stem.
    """
    if len(raters) < 2:
        raise UsageError(
            f"--rater needs at least two rater folders (got {len(raters)}); give --rater once "
            "per rater"
        )
    pred, raters, samples = Path(pred), [Path(r) for r in raters], [Path(s) for s in samples]
    try:
        kinds = {str(p): _kind(p) for p in (pred, *raters, *samples)}
        if kinds[str(pred)] == "file":
            for p in (*raters, *samples):
                if kinds[str(p)] != "file":
                    raise UsageError(
                        f"{pred} is a file but {p} is a folder; pass files or folders throughout"
                    )
            stem = _stem(pred, pred_suffix)
            return RaterPairing([RaterPair(stem, pred, tuple(raters), tuple(samples))])
        for p in (*raters, *samples):
            if kinds[str(p)] != "folder":
                raise UsageError(
                    f"{pred} is a folder but {p} is a file; pass files or folders throughout"
                )
        preds = _index(pred, PRED_SUFFIXES, pred_suffix, "prediction")
        indexes = [_index(r, TARGET_SUFFIXES, gt_suffix, "rater") for r in raters]
        sample_indexes = [_index(s, PRED_SUFFIXES, pred_suffix, "sample") for s in samples]
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", path=err.filename) from None
    _check_same_stems(raters, indexes)
    stems = sorted(indexes[0])
    pairs = []
    for s in stems:
        if s not in preds:
            continue
        for folder, index in zip(samples, sample_indexes):
            if s not in index:
                raise InputError(
                    f"no sample map for {s!r} (every --samples folder must hold a map of each "
                    "evaluated image)",
                    path=folder,
                )
        pairs.append(RaterPair(
            s, preds[s], tuple(index[s] for index in indexes),
            tuple(index[s] for index in sample_indexes),
        ))  # fmt: skip
    missing_pred = [indexes[0][s] for s in stems if s not in preds]
    missing_target = [preds[s] for s in sorted(preds) if s not in indexes[0]]
    if not pairs:
        raise InputError(
            f"no prediction in {pred} has rater masks with the same stem in {raters[0]} "
            "(check --pred-suffix / --gt-suffix)",
            path=pred,
        )
    return RaterPairing(pairs, missing_pred, missing_target)


def _check_same_stems(folders: Sequence[Path], indexes: Sequence[dict[str, Path]]) -> None:
    """Every rater folder holds the same stems; else an InputError naming an odd file."""
    every = set().union(*indexes)
    for folder, index in zip(folders, indexes):
        lacking = sorted(every - set(index))
        if lacking:
            have = next(ix[lacking[0]] for ix in indexes if lacking[0] in ix)
            more = f" ({len(lacking)} stems in all)" if len(lacking) > 1 else ""
            raise InputError(
                f"rater folder {folder} has no mask with this stem{more}; every --rater folder "
                "must hold the same stems",
                path=have,
            )


@dataclass(frozen=True)
class RaterBand:
    """A chunk of pixels [start, stop): the raters' codes and frequency map there."""

    codes: np.ndarray  # (R, n) int64 class codes, negative where a rater ignored the pixel
    q: np.ndarray  # (C, n) float32 frequency map (0 where no rater labels the pixel)
    valid: np.ndarray | None  # (n,) pixels some rater labels; None when all are
    counts: np.ndarray  # (C, n) int64: how many raters gave each pixel each class


class RaterMasks:
    """The raters' masks of one image, checked: one shape, only classes or ignore values."""

    def __init__(self, paths: Sequence[Path], labels, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 masks: Sequence[np.ndarray] | None = None):  # fmt: skip
        """``labels``: the LabelSpec that maps raw values to class codes (settings.labels).
        ``masks``: the masks already in memory (``paths`` then only name them). A large
        mask stays a ``LabelBands``: its label check reads it band by band, and so do
        ``codes``/``band``/``rows``."""
        self.paths = tuple(Path(p) for p in paths)
        self.labels = labels
        self.masks = []
        for k, path in enumerate(self.paths):
            mask = read_target(path, max_pixels=max_pixels) if masks is None else masks[k]
            if mask.ndim != 2:
                raise ShapeError(
                    f"a label mask must be 2-D (H, W), got shape {tuple(mask.shape)}", path=path
                )
            if self.masks and mask.shape != self.masks[0].shape:
                raise ShapeError(
                    f"shape {tuple(mask.shape)} does not match the first rater's "
                    f"{self.paths[0]} {tuple(self.masks[0].shape)}",
                    path=path,
                )
            labels.check(mask, path)
            self.masks.append(mask)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.masks[0].shape)

    @property
    def n_pixels(self) -> int:
        return self.masks[0].size

    @property
    def n_raters(self) -> int:
        return len(self.masks)

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    def codes(self, start: int, stop: int) -> np.ndarray:
        """(R, n) class codes of pixels [start, stop), negative where ignored."""
        return np.stack(
            [np.asarray(self.labels.codes(m.reshape(-1)[start:stop]), np.int64) for m in self.masks]
        )

    def band(self, start: int, stop: int) -> RaterBand:
        """The codes and frequency map of pixels [start, stop) (row-major)."""
        from ..core.raters import class_counts, frequency_from_counts

        codes = self.codes(start, stop)
        counts = class_counts(codes, self.num_classes)
        q, raters = frequency_from_counts(counts, (codes >= 0).sum(axis=0))
        labelled = raters > 0
        return RaterBand(codes, q, None if labelled.all() else labelled, counts)

    def rows(self, r0: int, r1: int) -> RaterBand:
        """The band of rows [r0, r1)."""
        W = self.shape[1]
        return self.band(r0 * W, r1 * W)
