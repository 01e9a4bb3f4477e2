"""Errors and exit codes of the klseg command: one line on stderr, never a traceback
(unless --debug). 0 success, 1 a requirement failed, 2 a usage, input or output error,
3 an internal error (a bug), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141
stdout closed by its reader."""

from __future__ import annotations

import functools
import sys

import typer

from ..errors import KlsegError

EXIT_INTERNAL = 3
"""An unexpected exception (a bug): never 1, which CI reads as a failed requirement."""


def _one_line(text: str) -> str:
    from ..render.report import printable

    return printable(" ".join(str(text).split()))


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line on stderr and return the Exit to raise."""
    sys.stderr.write(f"Error: {_one_line(message)}\n")
    sys.stderr.flush()
    return typer.Exit(code=code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup (temporary files and folders) runs."""


def _on_sigterm(_signum, _frame) -> None:
    raise Terminated()


def handle_errors(func):
    """KlsegError → one stderr line + its exit code (2); Ctrl-C → 130, SIGTERM → 143;
    any other exception is a bug → one line + exit 3. ``--debug`` raises instead."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ..io.outputs import ReportInterrupted

        debug = kwargs.get("debug", False)
        try:
            return func(*args, **kwargs)
        except (typer.Exit, SystemExit):
            raise
        except KlsegError as err:
            if debug:
                raise
            raise fail(str(err), err.exit_code) from None
        except KeyboardInterrupt as err:
            if debug:
                raise
            import signal

            sigterm = isinstance(err, Terminated) or getattr(err, "signum", 0) == signal.SIGTERM
            what = "terminated" if sigterm else "interrupted"
            if isinstance(err, ReportInterrupted):
                done = f"the report in {err.report} was completed first"
            else:
                done = "no report was written"
            raise fail(f"{what}; {done}", 143 if what == "terminated" else 130) from None
        except BrokenPipeError:  # `klseg ... | head`: the reader left; not a failed gate
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the final flush must not fail again
            raise typer.Exit(code=141) from None  # as a shell reports a SIGPIPE death
        except Exception as err:
            if debug:
                raise
            text = str(err)
            text = text if len(text) <= 300 else text[:300] + "…"
            hint = "rerun with --debug for a traceback"
            raise fail(
                f"internal error: {type(err).__name__}: {text}; {hint}", EXIT_INTERNAL
            ) from None

    return wrapper
