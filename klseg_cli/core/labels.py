"""What a target's raw label values mean: a class, ignored, or an error.

Data sets write labels in their own conventions: an ignore value (255, or 0 for "void"
inside the class range), ids that a table maps to training ids (Cityscapes' labelIds →
trainIds, ``--label-map``), or 0 as "unlabelled" with every other label shifted by one
(ADE20K, ``--reduce-zero-label``). ``LabelSpec`` turns raw values into *codes*, chunk by
chunk, and the rest of klseg only ever sees codes:

    0 … C−1   the class
    IGNORED   counts nowhere (an ignore value, or an id the label map does not list)
    BAD       neither: an error that names the raw value and its pixel count

Ignore values always apply to the raw value, before any mapping. Codes are int32, whatever
the file's dtype or byte order, so the compiled kernel needs a single specialisation.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, LabelError, UsageError

IGNORED = -1
BAD = -2
DEFAULT_IGNORE_INDEX = 255
"""Ignored when no ignore value is given, unless it is a class's label (see below)."""
LABEL_CHUNK = 1 << 20
_LUT_SPAN = 1 << 20  # raw value ranges up to this wide are mapped through a lookup table

CITYSCAPES_TRAIN_IDS = {
    -1: 255, 0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255,
    10: 255, 11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7,
    21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16,
    32: 17, 33: 18,
}  # fmt: skip
"""Cityscapes labelIds → trainIds (cityscapesScripts' ``labels.py``); 255 is ignored."""
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
BUILTIN_LABEL_MAPS = {"cityscapes": (CITYSCAPES_TRAIN_IDS, CITYSCAPES_CLASSES)}


@dataclass(frozen=True)
class LabelMap:
    """A raw id → class id table (``--label-map``); ids it does not list are ignored."""

    name: str = field(compare=False)  # a built-in name, or the file it was read from
    table: tuple[tuple[int, int], ...] = ()
    class_names: tuple[str, ...] = field(default=(), compare=False)  # a built-in map's names

    def as_dict(self) -> dict:
        return {"name": self.name, "map": {str(k): v for k, v in self.table}}


def default_ignore_index(num_classes: int, *, reduce_zero_label: bool = False) -> tuple[int, ...]:
    """The ignore values when none are given: (255,), unless 255 is a class's label.

    With more than 255 classes (ADE20K-full's 847, COCO-Stuff's raw ids, medical atlases)
    label 255 is class 255 (class 254 under ``--reduce-zero-label``, from 255 classes on),
    and ignoring it by default would drop that class from every sum and mean without a word.
    Given ignore values are always used as given (``--ignore-index 255`` still ignores it).
    """
    first_class_label = 1 if reduce_zero_label else 0
    if DEFAULT_IGNORE_INDEX - first_class_label < num_classes:
        return ()
    return (DEFAULT_IGNORE_INDEX,)


def _int(text, path, what: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise InputError(f"{what} {text!r} is not an integer", path=path) from None
    if not -(2**31) <= value < 2**31:
        raise InputError(f"{what} {value} is out of range", path=path)
    return value


def load_label_map(spec: str | Path) -> LabelMap:
    """``--label-map cityscapes``, or a JSON object / two-column CSV file: raw id → class id.

    A class id of ``null`` (JSON) or an empty cell (CSV) maps the raw id to "ignored", as do
    ignore values (e.g. 255, Cityscapes' convention).
    """
    name = str(spec)
    if name.lower() in BUILTIN_LABEL_MAPS:
        table, classes = BUILTIN_LABEL_MAPS[name.lower()]
        ignored = {raw: (IGNORED if cls == 255 else cls) for raw, cls in table.items()}
        return LabelMap(name.lower(), tuple(sorted(ignored.items())), classes)
    path = Path(spec)
    if not path.is_file():
        builtins = ", ".join(BUILTIN_LABEL_MAPS)
        raise InputError(f"no such label-map file (built-in maps: {builtins})", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read label map ({err})", path=path) from None
    pairs: dict[int, int] = {}
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"label map is not valid JSON ({err.msg})", path=path) from None
        if not isinstance(data, dict):
            raise InputError("a JSON label map must be an object {raw id: class id}", path=path)
        for raw, cls in data.items():
            value = IGNORED if cls is None else _int(cls, path, "class id")
            pairs[_int(raw, path, "raw id")] = value
    else:
        for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if len(cells) != 2:
                raise InputError(
                    f"line {lineno}: a label map row is 'raw id,class id', got {row!r}",
                    path=path,
                )
            if lineno == 1 and not cells[0].lstrip("-").isdigit():
                continue  # a header row
            raw = _int(cells[0], path, f"line {lineno}: raw id")
            if raw in pairs:
                raise InputError(f"line {lineno}: raw id {raw} is listed twice", path=path)
            pairs[raw] = IGNORED if cells[1] == "" else _int(cells[1], path, "class id")
    if not pairs:
        raise InputError("label map lists no ids", path=path)
    return LabelMap(str(path), tuple(sorted(pairs.items())))


@dataclass(frozen=True)
class LabelSpec:
    """How raw label values become class codes (see the module docstring)."""

    num_classes: int
    ignore_index: tuple[int, ...] = (255,)
    label_map: LabelMap | None = None
    reduce_zero_label: bool = False
    _luts: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.label_map is not None and self.reduce_zero_label:
            raise UsageError("--label-map and --reduce-zero-label do not go together")
        if self.label_map is not None:
            ignore = set(self.ignore_index)
            bad = [
                (raw, cls)
                for raw, cls in self.label_map.table
                if cls != IGNORED and cls not in ignore and not 0 <= cls < self.num_classes
            ]
            if bad:
                shown = ", ".join(f"{r} → {c}" for r, c in bad[:5])
                raise UsageError(
                    f"label map {self.label_map.name} maps ids to values that are neither "
                    f"classes 0..{self.num_classes - 1} nor ignore values: {shown}"
                )

    @property
    def ignored_classes(self) -> tuple[int, ...]:
        """Ignore values inside 0..C−1 when labels are class ids as they stand: those classes
        have no target pixels, so every class mean leaves them out."""
        if self.label_map is not None or self.reduce_zero_label:
            return ()
        return tuple(sorted(v for v in self.ignore_index if 0 <= v < self.num_classes))

    @property
    def plain(self) -> bool:
        """Labels are class ids as they stand and no ignore value is a class: every raw
        value in 0..C−1 is its class and every other is ignored (or an error). The kernel
        then reads raw labels and masks the rest itself, with no per-pixel mapping."""
        return (
            self.label_map is None
            and not self.reduce_zero_label
            and not any(0 <= v < self.num_classes for v in self.ignore_index)
        )

    def _map_values(self, v: np.ndarray) -> np.ndarray:
        """Codes of int64 raw values (vectorised; used directly or to build a table)."""
        C = self.num_classes
        if self.label_map is not None:
            keys = np.array([k for k, _ in self.label_map.table], dtype=np.int64)
            vals = np.array([c for _, c in self.label_map.table], dtype=np.int64)
            vals = np.where((vals >= 0) & (vals < C), vals, IGNORED)  # ignore values
            idx = np.clip(np.searchsorted(keys, v), 0, len(keys) - 1)
            out = np.where(keys[idx] == v, vals[idx], IGNORED)
        elif self.reduce_zero_label:
            m = v - 1
            out = np.where((m >= 0) & (m < C), m, BAD)
            out[v == 0] = IGNORED
        else:
            out = np.where((v >= 0) & (v < C), v, BAD)
        if self.ignore_index:
            out[np.isin(v, np.asarray(self.ignore_index, dtype=np.int64))] = IGNORED
        return out.astype(np.int32)

    def _lut(self, lo: int, hi: int) -> np.ndarray:
        key = (lo, hi)
        lut = self._luts.get(key)
        if lut is None:
            lut = self._map_values(np.arange(lo, hi + 1, dtype=np.int64))
            if len(self._luts) < 8:
                self._luts[key] = lut
        return lut

    def codes(self, raw: np.ndarray) -> np.ndarray:
        """Class codes (int32) of a chunk of raw labels."""
        y = np.asarray(raw)
        if y.dtype.kind == "b":
            y = y.view(np.uint8)
        if y.dtype.kind not in "iu":
            raise LabelError(f"labels of dtype {y.dtype} are not integers")
        if y.size == 0:
            return np.empty(y.shape, dtype=np.int32)
        if y.dtype.itemsize == 1:
            lo, hi = (0, 255) if y.dtype.kind == "u" else (-128, 127)
        elif y.dtype.kind == "u" and y.dtype.itemsize == 2:
            lo, hi = 0, 65535
        else:
            lo, hi = int(y.min()), int(y.max())
            if hi - lo >= _LUT_SPAN:
                return self._map_values(y.astype(np.int64))
        lut = self._lut(lo, hi)
        return lut[y] if lo == 0 else lut[y.astype(np.intp) - lo]

    def check(self, labels: np.ndarray, path: Path | str | None = None) -> None:
        """Raise LabelError for raw labels that are neither classes nor ignored.

        Unknown labels are never dropped silently: the message gives each raw value and its
        pixel count. Works through the (flat) labels in chunks, so memory stays bounded.
        """
        bad_counts: dict[int, int] = {}
        flat = labels.reshape(-1)
        plain = self.plain and flat.dtype.kind in "iu"
        for start in range(0, flat.size, LABEL_CHUNK):
            y = np.asarray(flat[start : start + LABEL_CHUNK])
            if plain:  # the common case, a compare: values ≥ C (or < 0) are ignored or bad
                out = y >= self.num_classes
                if y.dtype.kind == "i":
                    out |= y < 0
                if not out.any():
                    continue
                y = y[out]
            codes = self.codes(y)
            bad = codes == BAD
            if bad.any():
                values, counts = np.unique(y[bad], return_counts=True)
                for v, c in zip(values.tolist(), counts.tolist()):
                    bad_counts[v] = bad_counts.get(v, 0) + c
        if bad_counts:
            values = sorted(bad_counts)
            shown = ", ".join(f"{v} ({bad_counts[v]} px)" for v in values[:10])
            more = f" and {len(values) - 10} more values" if len(values) > 10 else ""
            ign = ", ".join(map(str, sorted(self.ignore_index))) or "none"
            if self.reduce_zero_label:
                what = f"labels that are not 1..{self.num_classes} (--reduce-zero-label)"
            else:
                what = f"labels outside 0..{self.num_classes - 1}"
            raise LabelError(
                f"{what} that are not ignore values ({ign}): {shown}{more}; check --classes, "
                "add --ignore-index, or map raw ids with --label-map",
                path=path,
            )
