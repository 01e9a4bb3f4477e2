"""``klseg info``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .console import _console, _text
from .errors import handle_errors
from .options import (
    ClassesOpt,
    DebugOpt,
    LayoutOpt,
    MaxPixelsOpt,
    NpzKeyOpt,
    StrictZarrOpt,
    TimeoutOpt,
)


@handle_errors
def info(
    file: Annotated[str, typer.Argument(help="A prediction map or a target mask (or a URL).")],
    target: Annotated[
        Optional[str],
        typer.Option("--target", help="Target mask whose (H, W) decides the layout."),
    ] = None,
    layout: LayoutOpt = None,
    classes: ClassesOpt = None,
    npz_key: NpzKeyOpt = None,
    max_pixels: MaxPixelsOpt = 1 << 31,
    timeout: TimeoutOpt = None,
    strict_zarr: StrictZarrOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shape, dtype, detected layout, value range and sum check of one file.

    What to run when klseg rejects a file.

    Example:

        klseg info preds/frankfurt_000001.npy
    """
    from rich.table import Table

    from ..commands.info import inspect_file
    from ..engine.local import parse_classes

    names = parse_classes(classes)
    facts = inspect_file(
        file,
        target=target,
        layout=layout.value if layout else None,
        num_classes=len(names) or None,
        npz_key=npz_key,
        max_pixels=max_pixels,
        timeout=timeout,
        strict_zarr=strict_zarr,
    )
    table = Table(title=_text(file), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in facts.items():
        table.add_row(_text(key), _text(value))
    _console().print(table)
