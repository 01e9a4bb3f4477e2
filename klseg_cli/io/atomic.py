"""Atomic file output: write to a temporary sibling, then rename it into place.

A reader (or a CI step) never sees half a file, and a failed or interrupted run leaves the
old file, or none, behind. Two kinds of path are never replaced by a rename:

- a symbolic link is written *through*: the temporary file goes beside the file it points
  to and replaces that file, so the link itself stays (``--junit ci/gate.xml`` where
  ``ci/gate.xml`` links elsewhere; ``/dev/stdout``, a link to ``/proc/self/fd/1``);
- a special file (a terminal, a pipe, a FIFO, ``/dev/null``, ``/dev/full``) is a stream:
  the finished temporary file is copied into it, as ``cat tmp > path`` would.

Missing parent folders are created, as ``evaluate --out`` creates its report folder: one
rule for every output path (``heatmap -o new/x.png``, ``--junit ci/gate.xml``, ...). Every
OS error (permission denied, a file where a folder belongs, a full or read-only disk)
becomes an ``OutputError`` naming the path as the user gave it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import KlsegError, OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_error(path: Path | str, err: OSError) -> OutputError:
    """An OutputError naming ``path`` and what the OS said (no errno numbers)."""
    why = err.strerror or str(err)
    return OutputError(f"cannot write: {why}", path=path)


def _kind(path: Path) -> str:
    """``"missing"``, ``"file"``, ``"folder"`` or ``"special"`` (links followed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "missing"  # e.g. a dangling link's loop; creating it reports the real error
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    return "special"


def is_stream(path: Path | str) -> bool:
    """Whether ``path`` is a special file (terminal, FIFO, device) that output streams into."""
    return _kind(Path(path)) == "special"


def _make_parents(given: Path, where: Path) -> None:
    """Make the folder ``where`` (and its parents); a file in the way is named."""
    try:
        os.makedirs(where, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        probe = where
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        raise OutputError(f"cannot write: {probe} is a file, not a folder", path=given) from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path; on success its content replaces (or streams into) ``path``."""
    given = Path(path)
    kind = _kind(given)
    if kind == "folder":
        raise OutputError("is a folder; give a file name", path=given)
    if kind == "special":
        target, where = given, None  # streamed below: the temp file lives in the temp dir
    else:
        target = Path(os.path.realpath(given))  # through a symlink, never replacing it
        where = target.parent
    try:
        if where is not None:
            _make_parents(given, where)  # missing parents: made, as for --out
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=where)
        os.close(fd)
    except OSError as err:
        raise output_error(given, err) from None
    try:
        yield Path(tmp)
        if kind == "special":
            with open(tmp, "rb") as src, open(given, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.unlink(tmp)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, KlsegError):
            raise output_error(given, exc) from None
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically, or stream it."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def install_file(src: Path, dest: Path) -> None:
    """Move the finished file ``src`` to ``dest``: renamed over a file (through a symlink,
    never replacing the link; copied when the link leads to another file system), or
    streamed into a special file."""
    dest = Path(dest)
    kind = _kind(dest)
    if kind == "folder":
        raise OutputError("is a folder; klseg writes a file of that name", path=dest)
    try:
        if kind == "special":
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            return
        real = Path(os.path.realpath(dest))
        os.chmod(src, 0o666 & ~_umask())
        try:
            os.replace(src, real)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            with atomic_path(real) as tmp:
                shutil.copyfile(src, tmp)
    except OSError as err:
        raise output_error(dest, err) from None
