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
    "Evaluator": "commands.evaluator",
    "EvaluationResult": "engine.local",
    "ImageResult": "engine.local",
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
    "compare_models": "commands.compare",
    "evaluate": "engine.local",
    "evaluate_pair": "engine.local",
    "evaluate_raters": "engine.raters",
    "load_stats": "io.statsfile",
    "pixel_terms": "core.metrics",
    "write_reports": "render.report",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
