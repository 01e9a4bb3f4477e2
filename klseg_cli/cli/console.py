"""What the klseg command prints besides reports: rich consoles sized for CI logs,
progress on stderr, and text from files made safe for rich."""

from __future__ import annotations

import sys


def _console(*, stderr: bool = False):
    """A rich console; in a CI log (not a terminal) 160 columns wide instead of rich's 80,
    so that requirement texts and table captions are not wrapped mid-phrase."""
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=160 if wide else None)


def _stderr_console():
    return _console(stderr=True)


class _Ticker:
    """Progress callbacks for the library: a bar on stderr when it is a terminal; in CI logs
    (stderr not a terminal) a plain line every ``every`` seconds once a run is that long."""

    every = 5.0

    def __init__(self, console, description: str) -> None:
        self.console, self.description = console, description
        self.progress = self.task = None
        self.total = self.done = 0
        self.started = self.last = 0.0

    def start(self, total: int) -> None:
        import time

        self.total, self.done = total, 0
        self.started = self.last = time.monotonic()
        if total < 2 or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.progress = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=True,
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=total)

    def advance(self, _pair=None) -> None:
        import time

        self.done += 1
        if self.progress is not None:
            self.progress.advance(self.task)
            return
        now = time.monotonic()
        if self.total >= 2 and now - self.last >= self.every:
            self.last = now
            sys.stderr.write(
                f"{self.description}: {self.done}/{self.total} images, "
                f"{now - self.started:.0f} s elapsed\n"
            )
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def _progress(console, description: str) -> _Ticker:
    return _Ticker(console, description)


def _text(value) -> str:
    """Text from files (paths, class names) for rich: markup escaped, controls visible."""
    from rich.markup import escape

    from ..render.report import printable

    return escape(printable(str(value)))
