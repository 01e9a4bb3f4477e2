"""``stats.npz``: the per-image sufficient statistics beside a report (DESIGN §8).

One row of sums per image, so that any data-set metric can be recomputed for any subset or
resample of the images without reading a pixel again (``gate``, ``--baseline``, bootstrap).
Layout (every array plain float64, int64 or unicode; ``np.load(..., allow_pickle=False)``)::

    format         ()        "klseg-stats/1"
    klseg_version  ()        the version that wrote it
    settings       ()        summary.json's "settings" object as a JSON string
    fields         (F,)      names of the Stats fields stored below
    stems          (N,)      image stems, sorted (the order of per_image.csv)
    height, width  (N,)      int64
    <field>        (N, ...)  one Stats field per image: sums (N, 6), confusion (N, C, C),
                             class_kl (N, C), ..., n_clipped (N,)

With ``--rater`` (docs/design/multi-rater.md), also each image's multi-rater counts
(``core.raters.RaterStats``), so the ``*_pooled`` rater scores are rebuilt and resampled::

    rater_settings    ()             summary.json's "settings.raters" as a JSON string
    rater_items       (2,)           int64: the number of raters R and of samples S
    rater_dice_joint  (N, C, 10, 10) int64: pixels by (level of p_c, level of q_c)
    rater_pair_inter  (N, K, C)      int64: per item pair and class |a = c ∧ b = c|
    rater_pair_union  (N, K, C)      int64: ... |a = c ∨ b = c|;  K = (1+S+R choose 2)

These keys are optional: a file without them (any run without ``--rater``, or one written
before they existed) reads as before, and a reader that does not know them ignores them
(they are not in ``fields``), so the format tag stays ``klseg-stats/1``.

The Stats fields are found by iterating the dataclass, never listed by hand: a field added
to ``Stats`` is written and read back without a change here. Floating fields are stored as
float64, integer and boolean ones as int64; a field that is ``None`` is left out.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.metrics import MetricSettings
from ..core.raters import N_LEVELS, RATER_FIELDS, RaterStats, item_pairs
from ..core.stats import Stats
from ..errors import InputError

FORMAT = "klseg-stats/1"
FILE_NAME = "stats.npz"
META_KEYS = ("format", "klseg_version", "settings", "fields", "stems", "height", "width")


def _stored(value) -> np.ndarray | None:
    """A Stats field value as float64 or int64 (None stays None: not stored)."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    raise TypeError(f"Stats field of dtype {arr.dtype} cannot be stored without pickles")


def stack_stats(stats: Sequence[Stats], template: Stats) -> dict[str, np.ndarray]:
    """Every field of ``stats`` stacked per image: {field: (N, *shape)}.

    ``template`` (e.g. ``Stats.zeros``) gives the shapes when there are no images.
    """
    out = {}
    for f in dataclasses.fields(Stats):
        tmpl = _stored(getattr(template, f.name))
        if tmpl is None:
            continue
        rows = [_stored(getattr(s, f.name)) for s in stats]
        if any(r is None for r in rows):
            continue
        out[f.name] = np.stack(rows) if rows else np.empty((0, *tmpl.shape), tmpl.dtype)
    return out


def _template(s: MetricSettings) -> Stats:
    """Zero Stats with every field these settings compute (``--uncertainty``'s histograms)."""
    return Stats.zeros(s.num_classes, s.ece_bins, n_scores=len(s.uncertainty))


def settings_from_dict(d: Mapping) -> MetricSettings:
    """``MetricSettings`` from summary.json's ``settings`` (see ``MetricSettings.from_dict``)."""
    return MetricSettings.from_dict(d)


@dataclass
class StatsTable:
    """The per-image sums of one evaluation, one row per image (sorted by stem)."""

    stems: list[str]
    height: np.ndarray  # (N,) int64
    width: np.ndarray  # (N,) int64
    settings: dict  # summary.json's "settings"
    arrays: dict[str, np.ndarray]  # Stats field -> (N, ...)
    klseg_version: str = ""
    rater_settings: dict | None = None  # --rater: summary.json's "settings.raters"
    rater_items: tuple[int, int] | None = None  # --rater: (raters R, samples S)
    rater_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # RATER_FIELDS, (N, ...)

    def __len__(self) -> int:
        return len(self.stems)

    @classmethod
    def from_result(cls, result) -> StatsTable:
        """The table of an ``EvaluationResult`` (images sorted by stem)."""
        from .. import __version__

        images = sorted(result.images, key=lambda i: i.stem)
        s = result.settings
        table = cls(
            stems=[i.stem for i in images],
            height=np.array([i.height for i in images], dtype=np.int64),
            width=np.array([i.width for i in images], dtype=np.int64),
            settings=s.as_dict(),
            arrays=stack_stats([i.stats for i in images], _template(s)),
            klseg_version=__version__,
        )
        counts = [getattr(i, "raters", None) for i in images]
        if hasattr(result, "rater_settings") and counts and None not in counts:
            from ..core.raters import stack_rater_stats

            first = counts[0]
            table.rater_settings = dict(result.rater_settings)
            table.rater_items = (first.n_raters, first.n_samples)
            table.rater_arrays = stack_rater_stats(counts, first)
        return table

    def rater_stats(self, i: int) -> RaterStats | None:
        """Image ``i``'s multi-rater counts (None: not a ``--rater`` run)."""
        if self.rater_items is None:
            return None
        from ..core.raters import unstack_rater_stats

        return unstack_rater_stats(self.rater_arrays, i, *self.rater_items)

    def metric_settings(self) -> MetricSettings:
        return settings_from_dict(self.settings)

    def image_stats(self, i: int) -> Stats:
        """Image ``i``'s Stats, rebuilt field by field (absent fields keep their default)."""
        kwargs = {}
        for f in dataclasses.fields(Stats):
            if f.name in self.arrays:
                value = self.arrays[f.name][i]
                kwargs[f.name] = value.item() if value.ndim == 0 else value.copy()
        return Stats(**kwargs)

    def select(self, stems: Sequence[str]) -> StatsTable:
        """The rows of ``stems`` in that order (each must be in the table)."""
        where = {s: k for k, s in enumerate(self.stems)}
        idx = np.array([where[s] for s in stems], dtype=np.intp)
        return StatsTable(
            stems=list(stems), height=self.height[idx], width=self.width[idx],
            settings=self.settings, arrays={k: v[idx] for k, v in self.arrays.items()},
            klseg_version=self.klseg_version, rater_settings=self.rater_settings,
            rater_items=self.rater_items,
            rater_arrays={k: v[idx] for k, v in self.rater_arrays.items()},
        )  # fmt: skip

    def to_result(self):
        """An ``EvaluationResult`` whose ``summary()`` is the original run's (no paths)."""
        from ..core.results import EvaluationResult, ImageResult

        settings = self.metric_settings()
        rows = list(enumerate(zip(self.stems, self.height, self.width)))
        if self.rater_items is not None:  # --rater: the multi-rater scores too
            from ..core.raters import RaterEvaluationResult, RaterImageResult

            images = []
            for k, (stem, h, w) in rows:
                stats, counts = self.image_stats(k), self.rater_stats(k)
                images.append(RaterImageResult(stem, Path(stem), None, int(h), int(w), stats,
                                               raters=counts))  # fmt: skip
            rater_settings = dict(self.rater_settings or {})
            return RaterEvaluationResult(settings, images, rater_settings=rater_settings)
        images = [
            ImageResult(stem, Path(stem), None, int(h), int(w), self.image_stats(k))
            for k, (stem, h, w) in rows
        ]
        return EvaluationResult(settings=settings, images=images)


def write_stats(table: StatsTable, path: str | Path) -> None:
    """Write ``table`` to ``path`` (an open file or a path; compressed, no pickles)."""
    arrays = {
        "format": np.array(FORMAT),
        "klseg_version": np.array(table.klseg_version),
        "settings": np.array(json.dumps(table.settings, sort_keys=True)),
        "fields": np.array(list(table.arrays), dtype=str),
        "stems": np.array(table.stems, dtype=str),
        "height": np.asarray(table.height, dtype=np.int64),
        "width": np.asarray(table.width, dtype=np.int64),
    }
    if table.rater_items is not None:
        arrays["rater_settings"] = np.array(json.dumps(table.rater_settings or {}, sort_keys=True))
        arrays["rater_items"] = np.asarray(table.rater_items, dtype=np.int64)
        for name in RATER_FIELDS:
            arrays[f"rater_{name}"] = np.asarray(table.rater_arrays[name], dtype=np.int64)
    clash = set(arrays) & set(table.arrays)
    if clash:
        raise ValueError(f"Stats fields {sorted(clash)} clash with stats.npz's own keys")
    arrays.update(table.arrays)
    if isinstance(path, (str, Path)):
        with open(path, "wb") as fh:  # a file object: savez would append ".npz" to the name
            np.savez_compressed(fh, **arrays)
    else:
        np.savez_compressed(path, **arrays)


def load_stats(path: str | Path) -> StatsTable:
    """Read a stats.npz written by klseg; anything else is an InputError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InputError("no such file", path=path) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"not a klseg stats.npz ({err})", path=path) from None
    if not isinstance(arrays, dict) or str(arrays.get("format", "")) != FORMAT:
        raise InputError(f"not a klseg stats.npz (no format tag {FORMAT!r})", path=path)
    try:
        settings = json.loads(str(arrays["settings"][()]))
        fields = [str(f) for f in arrays["fields"]]
        stems = [str(s) for s in arrays["stems"]]
        n = len(stems)
        table = StatsTable(
            stems=stems,
            height=arrays["height"].astype(np.int64),
            width=arrays["width"].astype(np.int64),
            settings=settings,
            arrays={f: arrays[f] for f in fields},
            klseg_version=str(arrays["klseg_version"][()]),
        )
    except (KeyError, ValueError, IndexError) as err:
        raise InputError(
            f"not a klseg stats.npz (missing or bad entry: {err})", path=path
        ) from None
    known = {f.name for f in dataclasses.fields(Stats)}
    for name, arr in table.arrays.items():
        if arr.shape[:1] != (n,) or arr.dtype.kind not in "fi" or name not in known:
            raise InputError(
                f"not a klseg stats.npz (entry {name!r} of shape {arr.shape}, dtype {arr.dtype}; "
                f"{n} images)",
                path=path,
            )
    if table.height.shape != (n,) or table.width.shape != (n,):
        raise InputError("not a klseg stats.npz (height/width do not match stems)", path=path)
    if "rater_items" in arrays:
        _read_raters(table, arrays, path)
    return table


def _read_raters(table: StatsTable, arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """The optional ``--rater`` counts, checked against each other and the settings."""
    n = len(table.stems)
    try:
        items = tuple(int(k) for k in arrays["rater_items"].reshape(-1))
        settings = json.loads(str(arrays["rater_settings"][()]))
        stored = {f: arrays[f"rater_{f}"] for f in RATER_FIELDS}
        C = int(table.settings["num_classes"])
    except (KeyError, ValueError, TypeError) as err:
        raise InputError(
            f"not a klseg stats.npz (missing or bad rater entry: {err})", path=path
        ) from None
    if len(items) != 2 or items[0] < 2 or items[1] < 0 or not isinstance(settings, dict):
        raise InputError(f"not a klseg stats.npz (rater_items {items})", path=path)
    K = len(item_pairs(1 + items[1] + items[0]))
    shapes = {"dice_joint": (n, C, N_LEVELS, N_LEVELS), "pair_inter": (n, K, C),
              "pair_union": (n, K, C)}  # fmt: skip
    for name, arr in stored.items():
        if arr.shape != shapes[name] or arr.dtype.kind != "i":
            raise InputError(
                f"not a klseg stats.npz (entry 'rater_{name}' of shape {arr.shape}, dtype "
                f"{arr.dtype}; expected {shapes[name]} int64 for {n} images, {C} classes, "
                f"{items[0]} raters and {items[1]} samples)",
                path=path,
            )
    table.rater_settings, table.rater_items, table.rater_arrays = settings, items, stored


def stats_beside(summary_path: str | Path) -> Path:
    """Where the stats.npz of a summary.json is: in the same folder."""
    return Path(summary_path).parent / FILE_NAME


def check_matches_summary(table: StatsTable, summary: Mapping, path: Path) -> None:
    """Refuse a stats.npz that is not the one its summary.json was written with."""
    stems = [row.get("image") for row in summary.get("images", [])]
    if stems and stems != table.stems:
        raise InputError(
            f"its {len(table.stems)} images do not match the {len(stems)} of the summary.json "
            "beside it; write both with one klseg evaluate --out",
            path=path,
        )
