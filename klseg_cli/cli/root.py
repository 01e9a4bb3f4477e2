"""The ``klseg`` command: the Typer app, its commands (one module each: ``evaluate``,
``gate``, ``compare``, ``calibrate``, ``heatmap``, ``info``) and ``main``.

Each command parses options, calls the library, renders, exits; no maths and no file
parsing here. Exit codes: 0 success, 1 a requirement failed, 2 a usage,
input or output error (``KlsegError`` and Click's usage errors: one line on stderr), 3 an
internal error (a bug: one line and a hint to rerun with ``--debug`` for the traceback),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 stdout closed by its reader.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__
from .calibrate import calibrate
from .compare import compare
from .errors import _on_sigterm, _one_line
from .evaluate import evaluate
from .gate import gate
from .heatmap import heatmap
from .info import info


class OneLineErrors(TyperGroup):
    """Click's usage errors as one ``Error:`` line on stderr and exit 2 (Click prints the
    usage, a hint and the message: three lines, or a box under rich)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from typer import _click

        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _click.exceptions.NoArgsIsHelpError as err:
            err.show()  # `klseg` alone: the help text is the right answer (exit 2, as Click)
            sys.exit(err.exit_code)
        except _click.exceptions.ClickException as err:
            message = err.format_message().replace("Value error, ", "")  # Typer's pydantic text
            sys.stderr.write(f"Error: {_one_line(message)}\n")
            sys.exit(err.exit_code)
        except typer.Abort:
            sys.stderr.write("Error: aborted\n")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="klseg",
    help="KL divergence, cross-entropy, IoU and calibration for segmentation probability maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich help pulls in markdown-it and doubles start-up
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"klseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
) -> None:
    """KL divergence, cross-entropy, IoU and calibration for segmentation probability maps."""
    _print_library_warnings()


def _print_library_warnings() -> None:
    """The library's KlsegWarnings become one ``warning:`` line each on stderr."""
    import warnings

    from ..errors import KlsegWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KlsegWarning):
            sys.stderr.write(f"warning: {' '.join(str(message).split())}\n")
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    warnings.simplefilter("always", KlsegWarning)


for command in (evaluate, gate, compare, calibrate, heatmap, info):  # the order of --help
    app.command()(command)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)  # cleanup runs, as for Ctrl-C
    app()
