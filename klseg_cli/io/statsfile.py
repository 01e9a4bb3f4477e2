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

The Stats fields are found by iterating the dataclass, never listed by hand: a field added
to ``Stats`` is written and read back without a change here. Floating fields are stored as
float64, integer and boolean ones as int64; a field that is ``None`` is left out.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.metrics import MetricSettings
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

    def __len__(self) -> int:
        return len(self.stems)

    @classmethod
    def from_result(cls, result) -> StatsTable:
        """The table of an ``EvaluationResult`` (images sorted by stem)."""
        from .. import __version__

        images = sorted(result.images, key=lambda i: i.stem)
        s = result.settings
        return cls(
            stems=[i.stem for i in images],
            height=np.array([i.height for i in images], dtype=np.int64),
            width=np.array([i.width for i in images], dtype=np.int64),
            settings=s.as_dict(),
            arrays=stack_stats([i.stats for i in images], _template(s)),
            klseg_version=__version__,
        )

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
            klseg_version=self.klseg_version,
        )  # fmt: skip

    def to_result(self):
        """An ``EvaluationResult`` whose ``summary()`` is the original run's (no paths)."""
        from ..core.results import EvaluationResult, ImageResult

        settings = self.metric_settings()
        images = [
            ImageResult(stem, Path(stem), None, int(h), int(w), self.image_stats(k))
            for k, (stem, h, w) in enumerate(zip(self.stems, self.height, self.width))
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
    return table


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
