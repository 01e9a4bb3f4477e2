"""Per-pixel metric maps rendered as PNG heatmaps, band by band in bounded memory.

One pass over the prediction computes the metric per pixel (the same core and chunking as
``evaluate``) into a float32 (H, W) map, kept in memory for ordinary images and in a
temporary file for huge ones. The colour range, the colour mapping, the optional
downsampling, overlay, panels and legends then work on bands of rows, and the PNG is
written as a stream (see ``png.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.maps import (
    BAND_PIXELS,
    FIXED_RANGE,
    HEATMAP_METRICS,
    MetricMap,
)
from ..errors import InputError, UsageError
from ..io.png import write_rgb_png

DEFAULT_IGNORE_COLOR = "#808080"
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
LOG_DECADES = 3


@dataclass(frozen=True)
class HeatmapOptions:
    metric: str = "kl"
    cmap: str = "magma"
    vmin: float | None = None
    vmax: float | None = None
    percentile: float = 99.0
    log: bool = False
    ignore_color: str | None = None  # None: DEFAULT_IGNORE_COLOR, or a palette target's own
    overlay: Path | None = None
    alpha: float = 0.6
    colorbar: bool = False
    panel: bool = False
    max_side: int | None = None
    reduce: str = "max"
    view: object = None  # a volume's slices (volumes.SliceView: --slice, --montage)
    threshold: float | None = None  # uncertainty-error: score ≥ it is uncertain (None: UEO's)

    def __post_init__(self) -> None:
        if self.metric == "uncertainty-error":  # four colours: the legend always goes along
            object.__setattr__(self, "colorbar", True)
        if self.metric not in HEATMAP_METRICS:
            raise UsageError(
                f"--metric must be one of {', '.join(HEATMAP_METRICS)}, got {self.metric!r}"
            )
        if self.reduce not in ("max", "mean"):
            raise UsageError(f"--reduce must be 'max' or 'mean', got {self.reduce!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.max_side is not None and self.max_side < 1:
            raise UsageError(f"--max-side must be positive, got {self.max_side}")
        if self.vmin is not None and self.vmax is not None and not self.vmax > self.vmin:
            raise UsageError(f"--vmax ({self.vmax}) must be above --vmin ({self.vmin})")


# --- colour range -------------------------------------------------------------------------


def _bands(arr: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    for r in range(0, arr.shape[0], rows):
        yield arr[r : r + rows]


def _band_rows(width: int, multiple: int = 1) -> int:
    rows = max(1, BAND_PIXELS // max(width, 1))
    return max(multiple, rows - rows % multiple)


def percentile(values: np.ndarray, q: float, *, bins: int = 4096) -> float:
    """The q-th percentile of the finite values of a (H, W) map, band by band.

    The "lower" percentile (an actual value, as ``np.percentile(method="lower")``), from
    below: two histogram passes (``bins`` bins over the range, then ``bins`` within the bin that
    holds the rank) find it to 1/bins² of the value range without holding the values.
    NaN when no value is finite.
    """
    rows = _band_rows(values.shape[1])
    lo, hi, n = math.inf, -math.inf, 0
    for band in _bands(values, rows):
        finite = band[np.isfinite(band)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            n += finite.size
    if n == 0:
        return math.nan
    if hi == lo:
        return lo
    rank = q / 100.0 * (n - 1)
    for _ in range(2):
        counts = np.zeros(bins, dtype=np.int64)
        below = 0
        edges = np.linspace(lo, hi, bins + 1)
        for band in _bands(values, rows):
            finite = band[np.isfinite(band)]
            below += int(np.count_nonzero(finite < lo))
            inside = finite[(finite >= lo) & (finite <= hi)]
            counts += np.histogram(inside, bins=edges)[0]
        cum = below + np.cumsum(counts)
        k = int(np.searchsorted(cum, rank, side="right"))
        k = min(k, bins - 1)
        lo, hi = float(edges[k]), float(edges[k + 1])
    return lo


def _max_class(pred) -> int:
    rows = _band_rows(pred.shape[1])
    return max(int(np.asarray(band).max(initial=0)) for band in _bands(pred, rows))


def value_range(
    mm: MetricMap, options: HeatmapOptions, *, shared_vmax: float | None = None
) -> tuple[float, float, str]:
    """(vmin, vmax, where vmax comes from): given, fixed for 0..1 metrics, one scale for a
    folder (``shared_vmax``), else 0 and this map's ``percentile``."""
    fixed = mm.metric in FIXED_RANGE
    vmin = options.vmin if options.vmin is not None and mm.wrong is None else 0.0
    if options.vmax is not None and mm.wrong is None:
        vmax, source = options.vmax, "--vmax"
    elif fixed:
        vmax, source = FIXED_RANGE[mm.metric], "fixed"
    elif shared_vmax is not None:
        vmax, source = shared_vmax, f"{options.percentile:g}th pct, all images"
    else:
        vmax = percentile(mm.values, options.percentile)
        source = f"{options.percentile:g}th pct"
        if not math.isfinite(vmax):
            vmax = 1.0
    if not vmax > vmin:
        vmax = vmin + (1.0 if vmin == 0 else abs(vmin) * 1e-3)
    return vmin, vmax, source


class LogHistogram:
    """A mergeable histogram of non-negative values on log-spaced bins (0.25% wide, from
    1e-12 to 1e6): one pass over many maps gives a shared percentile for a folder's scale."""

    LO, HI, BINS = -12.0, 6.0, 1 << 14

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS + 2, dtype=np.int64)  # below LO, bins, above HI

    def add(self, values) -> None:
        rows = _band_rows(values.shape[1])
        for band in _bands(values, rows):
            v = np.asarray(band, dtype=np.float64)
            v = v[np.isfinite(v)]
            with np.errstate(divide="ignore"):
                t = (np.log10(np.maximum(v, 0.0)) - self.LO) / (self.HI - self.LO) * self.BINS
            idx = np.clip(np.floor(t), -1, self.BINS).astype(np.int64) + 1
            self.counts += np.bincount(idx, minlength=self.BINS + 2)

    def percentile(self, q: float) -> float:
        """The lower edge of the bin holding the q-th percentile (NaN when empty)."""
        n = int(self.counts.sum())
        if n == 0:
            return math.nan
        k = int(np.searchsorted(np.cumsum(self.counts), q / 100.0 * (n - 1), side="right"))
        if k == 0:
            return 0.0
        return float(10.0 ** (self.LO + (k - 1) / self.BINS * (self.HI - self.LO)))


# --- colour -------------------------------------------------------------------------------


def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 colours of a named colormap (matplotlib's names, via ``cmap``)."""
    import cmap

    try:
        lut = cmap.Colormap(name).lut(256)
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"unknown colormap {name!r}; try magma, viridis, inferno, turbo") from None
    return np.clip(np.rint(np.asarray(lut)[:, :3] * 255), 0, 255).astype(np.uint8)


def parse_color(text: str) -> tuple[int, int, int]:
    import cmap

    try:
        rgba = tuple(cmap.Color(text))
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"cannot read {text!r} as a colour; use a name or #rrggbb") from None
    return tuple(round(c * 255) for c in rgba[:3])


def _far(a, b, distance: float = 48.0) -> bool:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float))) >= distance


def class_palette(num_classes: int, ignore_rgb=None) -> np.ndarray:
    """(C, 3) uint8 distinct colours for class ids (tab10, tab20, tab20b, then repeated),
    leaving out any colour close to the ignore colour (tab10's grey is #7f7f7f)."""
    import cmap

    names = ("tab10",) if num_classes <= 10 else ("tab20", "tab20b")
    base = np.concatenate([np.asarray(cmap.Colormap(n).lut(20 if n != "tab10" else 10))[:, :3]
                           for n in names])  # fmt: skip
    base = np.clip(np.rint(base * 255), 0, 255).astype(np.uint8)
    if ignore_rgb is not None:
        base = base[[_far(c, ignore_rgb) for c in base]]
    reps = -(-num_classes // len(base))
    return np.tile(base, (reps, 1))[:num_classes]


def panel_colours(mm: MetricMap, num_classes: int, ignore_rgb, ignore_given: bool, ignore_index):
    """(class colours, ignore colour) for --panel. A palette-PNG target brings its own class
    colours and, unless --ignore-color is given, its ignore value's colour; class colours
    are kept apart from the ignore colour either way."""
    own_palette = mm.palette is not None and len(mm.palette) >= num_classes
    if own_palette:  # a default greyscale ramp is no palette: its colours must differ
        colours = mm.palette[:num_classes].copy()
        own_palette = all(
            _far(colours[i], colours[j]) for i in range(num_classes) for j in range(i)
        )
    if own_palette:
        own = [v for v in ignore_index if 0 <= v < len(mm.palette) and v >= num_classes]
        if not ignore_given and own:
            ignore_rgb = mm.palette[own[0]]
        if not all(_far(c, ignore_rgb) for c in colours):  # pick an ignore colour apart
            for candidate in ((128, 128, 128), (255, 255, 255), (0, 0, 0), (255, 0, 255)):
                if all(_far(c, candidate) for c in colours):
                    ignore_rgb = np.array(candidate, dtype=np.uint8)
                    break
        return colours, np.asarray(ignore_rgb, dtype=np.uint8)
    return class_palette(num_classes, ignore_rgb), np.asarray(ignore_rgb, dtype=np.uint8)


def normalize(values: np.ndarray, vmin: float, vmax: float, *, log: bool) -> np.ndarray:
    """Values → [0, 1]; ``log`` spreads the lowest LOG_DECADES decades below vmax."""
    t = (values.astype(np.float64) - vmin) / (vmax - vmin)
    np.clip(t, 0.0, 1.0, out=t)
    if log:
        k = 10.0**LOG_DECADES - 1.0
        t = np.log1p(k * t) / math.log1p(k)
    return t


def colorize(
    values: np.ndarray, lut: np.ndarray, vmin: float, vmax: float, *, log: bool, ignore_rgb
) -> np.ndarray:
    """(rows, W) values → (rows, W, 3) uint8; NaN (ignored) pixels get ``ignore_rgb``."""
    nan = np.isnan(values)
    t = normalize(np.where(nan, vmin, values), vmin, vmax, log=log)
    rgb = lut[np.rint(t * (len(lut) - 1)).astype(np.intp)]
    rgb[nan] = ignore_rgb
    return rgb


def block_reduce(band: np.ndarray, f: int, how: str) -> np.ndarray:
    """Reduce f×f blocks of a (rows, W) band, ignoring NaN; an all-NaN block stays NaN."""
    if f == 1:
        return band
    rows, W = band.shape
    ph, pw = -rows % f, -W % f
    if ph or pw:
        band = np.pad(band, ((0, ph), (0, pw)), constant_values=np.nan)
    blocks = band.reshape(band.shape[0] // f, f, band.shape[1] // f, f)
    if how == "max":
        return np.fmax.reduce(np.fmax.reduce(blocks, axis=3), axis=1)
    finite = ~np.isnan(blocks)
    total = np.where(finite, blocks, 0.0).sum(axis=(1, 3))
    count = finite.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _sample(arr: np.ndarray, f: int) -> np.ndarray:
    """Nearest-neighbour downsampling of a class map: the top-left pixel of each block."""
    return arr[::f, ::f] if f > 1 else arr


# --- text strips ---------------------------------------------------------------------------


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def fmt_value(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.3g}"


def colorbar_strip(
    width: int, lut, vmin, vmax, *, log: bool, label: str, clipped: bool = False, source: str = ""
) -> np.ndarray:
    """A legend strip: the colour gradient with vmin, middle and vmax values, the unit and
    where the range comes from; ">= vmax" when some values lie above it (drawn at vmax)."""
    from PIL import Image, ImageDraw

    height, margin, bar_h = 54, 10, 14
    img = Image.new("RGB", (width, height), BACKGROUND)
    bar_w = max(width - 2 * margin, 2)
    t = np.linspace(0.0, 1.0, bar_w)
    idx = np.rint(t * (len(lut) - 1)).astype(np.intp)
    bar = np.repeat(lut[idx][None], bar_h, axis=0)
    img.paste(Image.fromarray(bar, "RGB"), (margin, 6))
    draw = ImageDraw.Draw(img)
    font = _font(12)
    k = 10.0**LOG_DECADES - 1.0
    mid_t = 0.5
    mid = vmin + (vmax - vmin) * (((1 + k) ** mid_t - 1) / k if log else mid_t)
    y = 6 + bar_h + 4
    draw.text((margin, y), fmt_value(vmin), fill=TEXT, font=font)
    right = (">= " if clipped else "") + fmt_value(vmax)
    draw.text((margin + bar_w - draw.textlength(right, font=font), y), right, fill=TEXT, font=font)
    mid_text = fmt_value(mid)
    draw.text(
        (margin + bar_w / 2 - draw.textlength(mid_text, font=font) / 2, y),
        mid_text,
        fill=TEXT,
        font=font,
    )
    title = label + (" (log scale)" if log else "")
    if source:
        title += f"; scale {fmt_value(vmin)} to {fmt_value(vmax)} ({source})"
    draw.text((margin, y + 16), title, fill=TEXT, font=font)
    return np.asarray(img)


def error_legend_strip(width: int, lut, ignore_rgb) -> np.ndarray:
    """The legend of ``--metric error``: two colours, not a continuous scale."""
    entries = [("right (argmax = label)", tuple(lut[0])), ("wrong", tuple(lut[-1]))]
    return _swatches(width, [*entries, ("ignored", tuple(ignore_rgb))])


def legend_strip(width: int, names, palette, ignore_rgb, map_ignore_rgb=None) -> np.ndarray:
    """Class colour swatches with their names, wrapped over as many lines as needed (and the
    map's ignore colour when it is not the class panels')."""
    entries = [*zip(names, map(tuple, palette.tolist())), ("ignored", tuple(ignore_rgb))]
    if map_ignore_rgb is not None and tuple(map_ignore_rgb) != tuple(ignore_rgb):
        entries.append(("ignored (map)", tuple(map_ignore_rgb)))
    return _swatches(width, entries)


def _swatches(width: int, entries) -> np.ndarray:
    """Colour swatches with their names, wrapped over as many lines as needed."""
    from PIL import Image, ImageDraw

    font = _font(12)
    entries = [(name, tuple(int(v) for v in rgb)) for name, rgb in entries]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, line, placed = 10, 0, []
    for name, rgb in entries:
        w = 14 + 4 + int(probe.textlength(name, font=font)) + 14
        if x + w > width - 10 and x > 10:
            x, line = 10, line + 1
        placed.append((x, line, name, rgb))
        x += w
    height = 8 + 18 * (line + 1)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for x, ln, name, rgb in placed:
        y = 6 + 18 * ln
        draw.rectangle([x, y, x + 13, y + 13], fill=rgb, outline=TEXT)
        draw.text((x + 18, y), name, fill=TEXT, font=font)
    return np.asarray(img)


def title_strip(width: int, panel_w: int, titles) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, 18), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, title in enumerate(titles):
        text, font = _fit_title(draw, title, panel_w - 2)
        w = draw.textlength(text, font=font)
        draw.text((i * panel_w + max(1, (panel_w - w) / 2), 3), text, fill=TEXT, font=font)
    return np.asarray(img)


def _fit_title(draw, title: str, room: float):
    """(text, font) of a panel title that fits ``room`` pixels: a smaller font, then the
    title cut with "…" (panels under ~60 px drew their titles over each other)."""
    for size in (12, 10, 8):
        font = _font(size)
        if draw.textlength(title, font=font) <= room:
            return title, font
    for n in range(len(title) - 1, 0, -1):
        text = title[:n].rstrip() + "…"
        if draw.textlength(text, font=font) <= room:
            return text, font
    return "", font


# --- rendering -----------------------------------------------------------------------------


def _load_overlay(path: Path, size: tuple[int, int], map_size: tuple[int, int]) -> np.ndarray:
    """The photo as (h, w, 3) uint8 at the output size (a map-sized photo is box-filtered)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.size not in (size, map_size):
                raise InputError(
                    f"overlay is {img.size[0]}x{img.size[1]}, the map is "
                    f"{map_size[0]}x{map_size[1]}",
                    path=path,
                )
            rgb = img.convert("RGB")
            if rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.BOX)
            return np.asarray(rgb)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot read overlay image ({err})", path=path) from None


def render(
    mm: MetricMap,
    out: Path,
    options: HeatmapOptions,
    *,
    class_names=(),
    ignore_index=(255,),
    shared_vmax: float | None = None,
) -> dict:
    """Write ``mm`` as a PNG heatmap; returns what was drawn (size, range) for messages.

    ``shared_vmax``: the folder's common scale (see ``make_heatmaps``).
    """
    lut = colormap_lut(options.cmap)
    if mm.wrong is not None:  # uncertainty-error: four colours (uncertainty_map.py)
        from . import uncertainty_map

        lut = uncertainty_map.lut()
        threshold = options.threshold if options.threshold is not None else mm.threshold
    ignore_given = options.ignore_color is not None
    ignore_rgb = np.array(parse_color(options.ignore_color or DEFAULT_IGNORE_COLOR), np.uint8)
    vmin, vmax, source = value_range(mm, options, shared_vmax=shared_vmax)
    H, W = mm.height, mm.width
    f = 1 if options.max_side is None else max(1, math.ceil(max(H, W) / options.max_side))
    out_h, out_w = -(-H // f), -(-W // f)
    panel = options.panel
    if panel and mm.pred is None:
        raise UsageError("--panel needs the predicted classes; compute the map with_pred=True")
    n_panels = 3 if panel and mm.labels is not None else (2 if panel else 1)
    content_w = out_w * n_panels
    width = max(content_w, 300) if (options.colorbar or panel) else content_w
    photo = _load_overlay(options.overlay, (out_w, out_h), (W, H)) if options.overlay else None
    palette, panel_ignore = None, ignore_rgb
    if panel:  # the class panels may use a palette target's ignore colour; the map does not
        n_classes = len(class_names) or _max_class(mm.pred) + 1
        palette, panel_ignore = panel_colours(mm, n_classes, ignore_rgb, ignore_given, ignore_index)
    label = mm.metric + (f" ({mm.unit})" if mm.unit else "")
    clipped = False

    def class_rgb(ids: np.ndarray, invalid: np.ndarray) -> np.ndarray:
        rgb = palette[np.clip(ids, 0, len(palette) - 1)]
        rgb[invalid] = panel_ignore
        return rgb

    def target_codes(raw: np.ndarray) -> np.ndarray:
        if mm.codes is not None:
            return mm.codes(raw).astype(np.int64)
        lab = raw.astype(np.int64)
        return np.where(np.isin(lab, list(ignore_index)), -1, lab)

    top = []
    if panel:
        titles = (["target"] if mm.labels is not None else []) + ["predicted", label]
        top.append(title_strip(width, out_w, titles))

    def bottom() -> Iterator[np.ndarray]:  # drawn last: it says whether values were clipped
        if panel:
            names = list(class_names) or [str(c) for c in range(len(palette))]
            yield legend_strip(width, names, palette, panel_ignore, ignore_rgb)
        if mm.wrong is not None:
            yield uncertainty_map.legend(width, ignore_rgb, threshold, mm.unit, _swatches)
        elif options.colorbar and mm.metric == "error":
            yield error_legend_strip(width, lut, ignore_rgb)
        elif options.colorbar:
            yield colorbar_strip(width, lut, vmin, vmax, log=options.log, label=label,
                                 clipped=clipped, source=source)  # fmt: skip

    def bands() -> Iterator[np.ndarray]:
        nonlocal clipped
        yield from top
        rows = _band_rows(W, f)
        for r0 in range(0, H, rows):
            raw_vals = np.asarray(mm.values[r0 : r0 + rows])
            if mm.wrong is not None:  # uncertainty-error: scores → categories 0..3
                wrong = np.asarray(mm.wrong[r0 : r0 + rows])
                raw_vals = uncertainty_map.categories(raw_vals, wrong, threshold)
            clipped = clipped or bool(np.nanmax(raw_vals, initial=-math.inf) > vmax)
            vals = block_reduce(raw_vals, f, options.reduce)
            heat = colorize(vals, lut, vmin, vmax, log=options.log, ignore_rgb=ignore_rgb)
            if photo is not None:
                o0 = r0 // f
                base = photo[o0 : o0 + heat.shape[0]].astype(np.float32)
                heat = np.rint((1 - options.alpha) * base + options.alpha * heat).astype(np.uint8)
            parts = []
            if panel:
                ignored = np.isnan(_sample(raw_vals, f))
                if mm.labels is not None:
                    lab = target_codes(_sample(np.asarray(mm.labels[r0 : r0 + rows]), f))
                    parts.append(class_rgb(lab, (lab < 0) | (lab >= len(palette))))
                pred = _sample(np.asarray(mm.pred[r0 : r0 + rows]), f).astype(np.int64)
                parts.append(class_rgb(pred, ignored))
            parts.append(heat)
            band = np.concatenate(parts, axis=1) if len(parts) > 1 else heat
            if band.shape[1] < width:
                pad = np.empty((band.shape[0], width - band.shape[1], 3), np.uint8)
                pad[:] = BACKGROUND
                band = np.concatenate([band, pad], axis=1)
            yield band
        yield from bottom()

    strip_h = 0
    if panel:
        n_names = len(class_names) or len(palette)
        names = list(class_names) or [str(c) for c in range(n_names)]
        strip_h += legend_strip(width, names, palette, panel_ignore, ignore_rgb).shape[0]
    if mm.wrong is not None:
        strip_h += uncertainty_map.legend(width, ignore_rgb, threshold, mm.unit, _swatches).shape[0]
    elif options.colorbar:
        strip_h += (
            54 if mm.metric != "error" else error_legend_strip(width, lut, ignore_rgb).shape[0]
        )
    height = out_h + sum(t.shape[0] for t in top) + strip_h
    write_rgb_png(out, width, height, bands())
    return {"width": width, "height": height, "vmin": vmin, "vmax": vmax, "factor": f,
            "clipped": clipped, "source": source}  # fmt: skip


def write_raw(mm: MetricMap, path: Path) -> None:
    """The float32 metric map as a TIFF (NaN where ignored), atomically."""
    import tifffile

    from ..io.atomic import atomic_path

    H, W = mm.values.shape
    rows = _band_rows(W)
    strips = (np.asarray(mm.values[r : r + rows]) for r in range(0, H, rows))
    with atomic_path(Path(path)) as tmp:
        tifffile.imwrite(
            tmp,
            data=strips,
            shape=(H, W),
            dtype=np.float32,
            rowsperstrip=rows,
            bigtiff=H * W * 4 > 2**31,
            photometric="minisblack",
            metadata={"metric": mm.metric, "unit": mm.unit},
        )
