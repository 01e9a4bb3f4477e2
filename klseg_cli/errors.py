"""Exceptions raised by klseg.

    KlsegError                  base class; the CLI catches it and exits with its ``exit_code``
    ├── UsageError              options that do not fit together (exit 2)
    ├── OutputError             an output that cannot be written: no folder, no permission,
    │                           a full or read-only disk (exit 2)
    └── InputError              a file that cannot be used as given (exit 2)
        ├── ReadError           unreadable, truncated, or not the format its name says
        ├── ShapeError          shapes/layouts that do not fit together
        ├── ProbabilityError    NaN/Inf, values outside [0, 1], rows not summing to 1
        └── LabelError          labels outside 0..C-1 that are not ignore values

Every message is one line that names the file (when there is one), the problem and, where
possible, what to do about it. Anything else that escapes is a bug: the CLI says "internal
error" and exits 3 (``--debug`` shows the traceback), so CI never mistakes a crash for a
failed requirement (exit 1).
"""

from __future__ import annotations

from pathlib import Path


class KlsegError(Exception):
    """Base class of every error klseg raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None

    def with_path(self, path: str | Path) -> KlsegError:
        """Return a copy of this error that names ``path`` (keeps an existing path)."""
        if self.path is not None:
            return self
        return type(self)(self.message, path=path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class UsageError(KlsegError):
    """Options or arguments that do not fit together."""


class OutputError(KlsegError):
    """An output file or folder that cannot be written (named in the message)."""


class InputError(KlsegError):
    """A file that klseg cannot use as given."""


class ReadError(InputError):
    """A file that cannot be read: missing, unreadable, truncated, or not its format."""


class ShapeError(InputError):
    """Shapes or layouts of a prediction and its target that do not fit together."""


class ProbabilityError(InputError):
    """A prediction map that is not a valid probability distribution per pixel."""


class LabelError(InputError):
    """A target whose labels are neither classes nor ignore values."""


class KlsegWarning(UserWarning):
    """Something worth a look that does not stop the run (e.g. ``--input logits`` on maps
    that hold probabilities). The CLI prints it as one ``warning:`` line on stderr."""
