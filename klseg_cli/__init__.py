"""klseg: KL divergence, cross-entropy, IoU and calibration for segmentation probability maps.

The library behind the ``klseg`` command; everything the CLI does can be called from Python::

    import klseg_cli
    result = klseg_cli.evaluate("preds/", "labels/", classes="classes.txt")
    klseg_cli.write_reports(result.summary(), "report/", result=result)

and from arrays, in a training loop (sums only, picklable, mergeable)::

    ev = klseg_cli.Evaluator(19, ignore_index=255)
    ev.update(probs, labels)            # (N, C, H, W) and (N, H, W); NumPy, torch (CPU)...
    ev.compute()["dataset"]["miou_pooled"]

Submodules are imported on first use, so ``klseg --help`` does not pay for NumPy.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "EvaluationReport": "commands.evaluate",
    "EvaluationResult": "core.results",
    "Evaluator": "commands.evaluator",
    "ImageResult": "core.results",
    "InputError": "errors",
    "KlsegError": "errors",
    "LabelError": "errors",
    "MetricSettings": "core.metrics",
    "OutputError": "errors",
    "ProbabilityError": "errors",
    "RaterEvaluator": "commands.rater_evaluator",
    "ReadError": "errors",
    "ShapeError": "errors",
    "Stats": "core.stats",
    "UsageError": "errors",
    "calibrate": "commands.calibrate",
    "compare": "commands.compare:compare_models",
    "compare_models": "commands.compare",
    "evaluate": "engine.local",
    "evaluate_pair": "engine.image",
    "evaluate_raters": "engine.raters",
    "evaluate_report": "commands.evaluate",
    "heatmap": "commands.heatmap",
    "load_stats": "io.statsfile",
    "pixel_terms": "core.metrics",
    "write_reports": "render.report",
}
"""{name: its module} ("module:attribute" where the name differs): the public API. What the
commands do is ``evaluate_report``, ``compare``, ``calibrate`` and ``heatmap`` (keywords
named as the command's options); ``evaluate`` returns the result alone."""

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        module, _, attribute = _EXPORTS[name].partition(":")
        value = getattr(import_module(f".{module}", __name__), attribute or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
