"""``klseg calibrate``: fit a temperature on labelled maps and show what it changes.

The library behind the command (and usable from Python): pair the files, split them by
image into a fit part and an optional holdout part (``--holdout``, seeded), fit T on the
fit part (``calibration.fit_temperature``), then evaluate both parts before (T = 1) and
after (T) with the same code as ``klseg evaluate --temperature T``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..core.calibration import PassResult, TemperatureFit, fit_temperature, split_holdout
from ..core.metrics import MetricSettings
from ..core.results import EvaluationResult, ReadOptions
from ..engine.fit import PairData
from ..engine.local import Job, _results, plan
from ..errors import InputError, UsageError
from ..io.pairing import Pair, Pairing

TABLE_METRICS = ("kl", "ce", "ece", "mce", "brier", "accuracy", "miou")
"""The before/after table: what a temperature changes, and two things it must not."""


@dataclass
class Part:
    """One part of the images (``fit`` or ``holdout``), evaluated before and after."""

    name: str
    pairs: list[Pair]
    before: EvaluationResult
    after: EvaluationResult

    def table(self) -> dict[str, tuple[float, float]]:
        """metric → (before, after), pooled over the part's pixels."""
        b = self.before.summary()["dataset"]
        a = self.after.summary()["dataset"]
        return {m: (b[f"{m}_pooled"], a[f"{m}_pooled"]) for m in TABLE_METRICS}


@dataclass
class CalibrationRun:
    fit: TemperatureFit
    settings: MetricSettings  # the settings the maps were read with (T = 1)
    read: ReadOptions
    parts: list[Part] = field(default_factory=list)
    holdout: float | None = None
    seed: int = 0

    @property
    def temperature(self) -> float:
        return self.fit.temperature

    def part(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)

    def as_json(self) -> dict:
        """The ``calibration.json`` object."""
        from ..render.reliability import bin_rows

        def metrics(result: EvaluationResult) -> dict:
            total = result.total
            return {
                "n_images": len(result.images),
                "n_valid": total.n_valid,
                "dataset": result.summary()["dataset"],
                "reliability": bin_rows(total.ece_count, total.ece_conf, total.ece_correct),
            }

        return {
            "klseg_version": __version__,
            "temperature": self.fit.temperature,
            "at_bound": self.fit.at_bound,
            "method": "temperature scaling: p -> softmax(log p~ / T), T minimising the "
            "pooled KL(q || p_T) over every valid pixel of the fit part",
            "n_passes": self.fit.n_passes,
            "passes": [p.as_dict() for p in self.fit.passes],
            "settings": self.settings.as_dict(),
            "holdout": self.holdout,
            "seed": self.seed,
            "parts": {
                p.name: {
                    "images": [pair.stem for pair in p.pairs],
                    "before": metrics(p.before),
                    "after": metrics(p.after),
                }
                for p in self.parts
            },
        }


def _evaluate(pairs: list[Pair], settings: MetricSettings, read: ReadOptions, jobs: int,
              on_image=None) -> EvaluationResult:  # fmt: skip
    job = Job(Pairing(pairs=list(pairs)), settings, read)
    images = []
    for pair, outcome in _results(job, jobs):
        if isinstance(outcome, InputError):
            raise outcome
        images.append(outcome)
        if on_image is not None:
            on_image(pair)
    return EvaluationResult(settings=settings, images=images, read=read)


def calibrate(
    pred: str | Path,
    target: str | Path,
    *,
    holdout: float | None = None,
    seed: int = 0,
    jobs: int = 1,
    on_pass: Callable[[PassResult], None] | None = None,
    write: str | Path | None = None,
    **options,
) -> CalibrationRun:
    """Fit T on ``pred``/``target`` (files or folders) and evaluate before and after.

    ``options`` are those of ``evaluation.plan``. With ``holdout`` (a fraction), that share
    of the images (a seeded random choice) is left out of the fit and evaluated apart.
    ``write``: the folder the calibrated maps will go to, checked before the fit.

    Example::

        from klseg_cli.commands.calibrate import calibrate
        run = calibrate("val/preds", "val/labels", holdout=0.3)
        run.temperature, run.part("holdout").table()["kl"]
    """
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    job = plan(pred, target, **options)
    settings, read = job.settings, job.read
    if settings.temperature != 1.0:
        raise UsageError("calibrate fits a temperature to the maps as they are; omit it")
    pairs = list(job.pairing.pairs)
    if write is not None:
        from .calibrated_maps import check_write_folder

        check_write_folder(pairs, Path(write))
    if holdout is not None:
        fit_pairs, hold_pairs = split_holdout(pairs, holdout, seed)
    else:
        fit_pairs, hold_pairs = pairs, []
    hint = _pixel_count(fit_pairs, settings, read)
    data = PairData(fit_pairs, settings, read, n_pixels=hint)
    fit = fit_temperature(data, on_pass=on_pass)
    after = replace(settings, temperature=fit.temperature)
    run = CalibrationRun(fit, settings, read, holdout=holdout, seed=seed)
    for name, part in (("fit", fit_pairs), ("holdout", hold_pairs)):
        if part:
            run.parts.append(Part(name, part, _evaluate(part, settings, read, jobs),
                                  _evaluate(part, after, read, jobs)))  # fmt: skip
    return run


def _pixel_count(pairs: list[Pair], settings: MetricSettings, read: ReadOptions) -> int:
    """Pixels of all predictions, from their headers (sets the starting-point sample)."""
    from ..io.readers import open_prediction

    total = 0
    for pair in pairs:
        try:
            pm = open_prediction(pair.pred, hw=None, layout=read.layout,
                                 num_classes=settings.num_classes, npz_key=read.npz_key,
                                 max_pixels=read.max_pixels)  # fmt: skip
            total += pm.n_pixels
        except InputError:
            total += 1 << 20  # the pass itself reports the problem
    return total


def load_temperature(spec: str) -> float:
    """``--temperature``: a number, or a calibration.json written by ``klseg calibrate``."""
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise UsageError(
                f"--temperature {text!r} is neither a number nor a calibration.json file"
            ) from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            value = float(data["temperature"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                ValueError) as err:  # fmt: skip
            raise InputError(
                f"not a calibration.json with a temperature ({type(err).__name__})", path=path
            ) from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--temperature must be a positive number, got {text!r}")
    return value


def write_calibration(
    run: CalibrationRun,
    *,
    out: Path | None = None,
    write: Path | None = None,
    on_maps: Callable[[int], None] | None = None,
    on_report: Callable[[], None] | None = None,
) -> None:
    """The outputs of ``klseg calibrate``, never over an input: the calibrated maps into
    ``write`` (``on_maps(n)`` hears how many), then the report into ``out`` (``on_report``),
    so that a map that cannot be written leaves no report."""
    from ..render.formats import refuse_overwriting_inputs

    inputs = [p for part in run.parts for pair in part.pairs for p in (pair.pred, pair.target)]
    if out is not None:
        from ..render.calibration_report import CALIBRATE_FILES

        refuse_overwriting_inputs([out / n for n in CALIBRATE_FILES], inputs)
    if write is not None:
        from .calibrated_maps import write_calibrated

        pairs = [pair for part in run.parts for pair in part.pairs]
        pairs.sort(key=lambda p: p.stem)
        written = write_calibrated(
            pairs, replace(run.settings, temperature=run.fit.temperature), run.read, write
        )
        if on_maps is not None:
            on_maps(len(written))
    if out is not None:
        from ..render.calibration_report import write_calibration_outputs

        write_calibration_outputs(run, out)
        if on_report is not None:
            on_report()
