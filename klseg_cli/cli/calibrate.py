"""``klseg calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .console import _console, _stderr_console
from .errors import handle_errors
from .options import (
    DebugOpt,
    EvaluationOptions,
    evaluation_options,
    local_only,
)


@handle_errors
@evaluation_options(inside=("jobs",))
def calibrate(
    pred: Annotated[
        Path,
        typer.Argument(
            metavar="PRED", help="Prediction map file, or a folder of them.", callback=local_only
        ),
    ],
    gt: Annotated[
        Path,
        typer.Argument(
            metavar="GT", help="Target mask file, or a folder of them.", callback=local_only
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write calibration.json and reliability.png here."),
    ] = None,
    write: Annotated[
        Optional[Path],
        typer.Option(
            "--write",
            metavar="DIR",
            help="Write the calibrated maps here (same names, format and layout).",
        ),
    ] = None,
    holdout: Annotated[
        Optional[float],
        typer.Option(
            "--holdout",
            metavar="F",
            help="Leave this share of the images (a seeded choice) out of the fit and "
            "report before/after on them.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --holdout split.")] = 0,
    shared: EvaluationOptions = EvaluationOptions(),
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Images evaluated in parallel (before/after).")
    ] = 1,
    debug: DebugOpt = False,
) -> None:
    """Fit a temperature T that minimises the pooled KL(target || softmax(log p / T)).

    The relative-entropy optimization over a temperature (post-hoc calibration), exact over
    every valid pixel. Prints T, the passes over the data, and metrics before and after;
    accuracy and IoU do not change. Apply T later with evaluate --temperature.

    Example:

        klseg calibrate val/preds val/labels --holdout 0.3 --out calib/
    """

    from ..commands.calibrate import calibrate as run_calibration
    from ..commands.calibrate import write_calibration

    if out is not None:
        from ..io.outputs import check_out_dir

        check_out_dir(out)
    if write is not None and write.exists() and not write.is_dir():
        raise UsageError(f"--write {write} is an existing file; give a folder")
    options = shared.plan()
    err = _stderr_console()

    def on_pass(p) -> None:
        err.print(f"pass {len(run_passes) + 1}: T = {p.temperature:.6g}, mean KL "
                  f"{p.kl_mean:.6g}", highlight=False)  # fmt: skip
        run_passes.append(p)

    run_passes: list = []
    run = run_calibration(pred, gt, holdout=holdout, seed=seed, jobs=jobs, on_pass=on_pass,
                          write=write, **options)  # fmt: skip
    console = _console()
    fit = run.fit
    bound = " (at the search bound: the optimum lies beyond)" if fit.at_bound else ""
    console.print(
        f"T = {fit.temperature:.6g}{bound}  ({fit.n_passes} pass"
        f"{'es' if fit.n_passes != 1 else ''} over "
        f"{fit.n_valid:,} valid pixels)",
        highlight=False,
    )
    sizes = ", ".join(
        f"{p.name}: {len(p.pairs)} image{'s' if len(p.pairs) != 1 else ''}" for p in run.parts
    )
    console.print(sizes, highlight=False)
    for part in run.parts:
        from ..render.calibration_report import before_after_table

        console.print(before_after_table(run, part))

    def said(text: str) -> None:
        console.print(text, highlight=False)

    write_calibration(run, out=out, write=write,
                      on_maps=lambda n: said(f"{n} calibrated maps written to {write}/"),
                      on_report=lambda: said(f"calibration written to {out}/"))  # fmt: skip
