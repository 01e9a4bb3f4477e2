"""Which prediction goes with which target: pairing by file stem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from .readers import PRED_SUFFIXES, TARGET_SUFFIXES, PredictionMap


@dataclass(frozen=True)
class Pair:
    stem: str
    pred: Path
    target: Path | None


@dataclass
class Pairing:
    pairs: list[Pair]
    missing_pred: list[Path] = field(default_factory=list)  # targets without a prediction
    missing_target: list[Path] = field(default_factory=list)  # predictions without a target


def _ext(path: Path) -> str:
    """The file's extension, ``.nii.gz`` counted as one (its stem has neither part)."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def _strip(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if suffix and name.endswith(suffix) and name != suffix else name


def _index(folder: Path, suffixes: tuple[str, ...], strip: str, what: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() and path.suffix.lower() != ".zarr":  # a Zarr store is a folder
            continue
        if _ext(path).lower() not in (*suffixes, ".zarr"):
            continue
        stem = _strip(path.name[: -len(_ext(path))], strip)
        if stem in files:
            raise InputError(
                f"two {what} files have the stem {stem!r}: {files[stem].name} and {path.name}; "
                "keep one",
                path=folder,
            )
        files[stem] = path
    if not files:
        hint = ""
        if what == "prediction" and any(p.suffix.lower() == ".png" for p in folder.iterdir()):
            hint = "; it holds .png files, which are targets: are PRED and GT swapped?"
        raise InputError(
            f"no {what} files ({', '.join(suffixes)}) in this folder{hint}", path=folder
        )
    return files


def _unsupported(folder: Path, suffixes: tuple[str, ...], strip: str) -> dict[str, Path]:
    """Files of a folder with an extension klseg does not read, by stem."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and _ext(path).lower() not in suffixes:
            out.setdefault(_strip(path.name[: -len(_ext(path))] if _ext(path) else path.name,
                                  strip), path)  # fmt: skip
    return out


def _kind(path: Path) -> str:
    """``"file"``, ``"folder"`` or an InputError: missing, unreadable, or a FIFO/device."""
    import os
    import stat

    if getattr(path, "is_remote", False):  # a URL: the store tells (remote.py)
        return "file" if path.suffix.lower() == ".zarr" else path.kind()
    if path.suffix.lower() == ".zarr" and os.path.isdir(path):  # one Zarr map
        return "file"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError("no such file or folder", path=path) from None
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", path=path) from None
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    raise InputError("is not a regular file or a folder (a FIFO, device or socket)", path=path)


def pair_files(
    pred: Path,
    target: Path | None,
    *,
    pred_suffix: str = "",
    gt_suffix: str = "",
) -> Pairing:
    """See ``_pair_files``; an OS error while listing a folder is an InputError naming it."""
    try:
        return _pair_files(pred, target, pred_suffix=pred_suffix, gt_suffix=gt_suffix)
    except OSError as err:
        where = err.filename if err.filename is not None else pred
        raise InputError(f"cannot read: {err.strerror or err}", path=where) from None


def _pair_files(
    pred: Path,
    target: Path | None,
    *,
    pred_suffix: str = "",
    gt_suffix: str = "",
) -> Pairing:
    """Pair prediction and target files: two files, or two folders matched by stem.

    A stem is the file name without its extension and without the optional suffix
    (``--pred-suffix _prob``, ``--gt-suffix _gtFine_labelIds``). ``target=None`` pairs
    every prediction with no target (for target-free metrics such as entropy).
    """
    from .remote import as_input

    pred, target = as_input(pred), as_input(target)
    pred_kind = _kind(pred)
    target_kind = _kind(target) if target is not None else None
    if pred_kind == "file":
        if target_kind == "folder":
            raise UsageError(
                f"{pred} is a file but {target} is a folder; pass two files or two folders"
            )
        stem = _strip(pred.name[: -len(_ext(pred))] if _ext(pred) else pred.name, pred_suffix)
        return Pairing(pairs=[Pair(stem, pred, target)])
    if target_kind == "file":
        raise UsageError(
            f"{pred} is a folder but {target} is a file; pass two files or two folders"
        )
    preds = _index(pred, PRED_SUFFIXES, pred_suffix, "prediction")
    if target is None:
        return Pairing(pairs=[Pair(s, p, None) for s, p in preds.items()])
    targets = _index(target, TARGET_SUFFIXES, gt_suffix, "target")
    others = _unsupported(target, TARGET_SUFFIXES, gt_suffix)
    for stem in sorted(set(preds) - set(targets)):
        if stem in others:
            raise InputError(
                f"the target of {preds[stem].name} has an unsupported file type "
                f"{others[stem].suffix!r} (targets: {', '.join(TARGET_SUFFIXES)}); convert it, "
                "or move it out of the folder",
                path=others[stem],
            )
    pairs = [Pair(s, preds[s], targets[s]) for s in sorted(targets) if s in preds]
    missing_pred = [targets[s] for s in sorted(targets) if s not in preds]
    missing_target = [preds[s] for s in sorted(preds) if s not in targets]
    if not pairs:
        raise InputError(
            f"no prediction in {pred} has a target with the same stem in {target} "
            "(check --pred-suffix / --gt-suffix)",
            path=pred,
        )
    return Pairing(pairs=pairs, missing_pred=missing_pred, missing_target=missing_target)


@dataclass
class OpenedPair:
    pred: PredictionMap
    target: np.ndarray | PredictionMap | None
    height: int
    width: int
    spatial: tuple[int, ...] | None = None  # a volume's shape (volumes.py); None: (H, W)
    spacing: tuple[float, ...] | None = None  # voxel spacing from a NIfTI header
