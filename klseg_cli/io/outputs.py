"""Publishing a report folder as one run's report, and checks on output paths.

``klseg evaluate --out DIR`` writes several files (the CSVs, ``summary.json``, optionally
``heatmaps/``). A report is one run's report, so:

- **One writer at a time.** The whole write holds an exclusive ``flock`` on the folder
  DIR itself (no lock file): concurrent runs into one DIR take turns, and the last one to finish
  leaves a complete report of its own, never its ``summary.json`` beside another run's CSVs.
- **Staged, then published.** Every file (heatmaps included) is first written into a fresh
  hidden folder ``DIR/.klseg-staging-*``, then renamed into place with SIGINT and SIGTERM
  held back, so an interrupted run changes nothing in DIR, and the staging folder is
  always removed (one left by a run killed with SIGKILL is removed by the next run).
- **Only our own files.** ``DIR/.klseg-manifest.json`` lists what klseg wrote; files of an
  earlier run that this run does not write again (last run's heatmaps) are removed, and
  nothing else in DIR is touched. Report files that are symlinks are written through.

Every OS error is an ``OutputError`` naming the path (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from ..errors import OutputError, UsageError
from .atomic import install_file, is_stream, output_error, write_text

MANIFEST_NAME = ".klseg-manifest.json"
STAGING_PREFIX = ".klseg-staging-"


class ReportInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM that arrived while a report was being published; it was completed
    first (``report`` is the folder), so "no report was written" would be wrong."""

    def __init__(self, report: Path, signum: int = signal.SIGINT) -> None:
        super().__init__(str(report))
        self.report, self.signum = report, signum


def make_dir(out: Path) -> Path:
    """Create ``out`` (and its parents) or raise an OutputError naming it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError("is an existing file; give a folder", path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create folder ({err.strerror or err})", path=out) from None
    return out


def check_out_dir(out: Path) -> Path:
    """Fail before any work on an ``--out`` that cannot become a report folder: an existing
    file, a folder we may not enter, or a missing one whose nearest existing parent we may
    not write into (the write itself still reports any other error)."""
    out = Path(out)
    probe = out
    while True:
        try:
            mode = os.stat(probe).st_mode
        except FileNotFoundError:
            if probe.parent == probe:
                break
            probe = probe.parent
            continue
        except OSError as err:
            raise OutputError(f"cannot use as a folder ({err.strerror or err})", path=out) from None
        if probe == out and not stat.S_ISDIR(mode):
            raise UsageError(f"--out {out} is an existing file; give a folder")
        if not stat.S_ISDIR(mode):
            raise OutputError(f"cannot create folder: {probe} is a file", path=out)
        if not os.access(probe, os.W_OK | os.X_OK):
            raise OutputError("cannot create folder: Permission denied", path=out)
        break
    return out


def check_output_file(path: Path, option: str, *, report_dir: Path | None = None) -> None:
    """Fail before any work on an output file that cannot be written: a folder, a parent
    folder that cannot be made or written into, an unwritable special file (the write
    reports the rest). Missing parent folders are made when the file is written
    (``atomic.atomic_path``). A file inside ``report_dir`` is let through: that folder is
    made with the report."""
    path = Path(path)
    if report_dir is not None and _resolved(path).is_relative_to(_resolved(Path(report_dir))):
        return
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a file in the way: named below
        mode = None
    except OSError as err:
        raise OutputError(f"cannot write: {err.strerror or err}", path=path) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if mode is not None and not stat.S_ISREG(mode):
        if not os.access(path, os.W_OK):
            raise OutputError("cannot write: Permission denied", path=path)
        return
    parent = Path(os.path.realpath(path)).parent
    if not parent.is_dir():  # made with the file, if its nearest existing folder allows
        probe = parent
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise OutputError(f"cannot write: {probe} is a file, not a folder", path=path)
        try:
            check_out_dir(parent)
        except OutputError as err:
            raise OutputError(f"cannot write: {err.message}", path=path) from None
        return
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("cannot write: Permission denied", path=path)
    _probe_folder(parent, path)


def _probe_folder(parent: Path, path: Path) -> None:
    """Create and remove a file of our own in ``parent``: what ``os.access`` cannot know
    (root in /proc, a read-only mount, a full quota) fails here, before any work."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".klseg-probe-", dir=parent)
    except OSError as err:
        raise OutputError(f"cannot write: {err.strerror or err}", path=path) from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder ``out`` (waits for another klseg run)."""
    import fcntl

    try:
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError as err:
        raise output_error(out, err) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM are recorded, not acted on, until the block ends (main thread
    only: Python runs signal handlers there); yields the list of those that arrived."""
    arrived: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return

    def record(signum, _frame) -> None:
        arrived.append(signum)

    saved = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield arrived
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _read_manifest(out: Path) -> list[str]:
    """Relative paths klseg wrote last time (anything odd in the manifest is ignored)."""
    try:
        with open(out / MANIFEST_NAME, encoding="utf-8") as fh:
            data = json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return []
    safe = []
    for name in files:
        if not isinstance(name, str) or not name or "\0" in name:
            continue
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or parts[0].startswith("."):
            continue
        safe.append(name)
    return safe


def _walk(folder: Path) -> list[str]:
    return sorted(
        str(Path(root, name).relative_to(folder))
        for root, _, names in os.walk(folder)
        for name in names
    )


def _check_destinations(out: Path, names: Iterable[str]) -> None:
    """Refuse, before anything moves, a destination that is a folder or has a file in the
    way of its folder (a file called ``heatmaps``)."""
    for name in names:
        dest = out / name
        for parent in list(Path(name).parents)[:-1]:
            p = out / parent
            if p.exists() and not p.is_dir():
                raise OutputError("is a file, but the report needs a folder there", path=p)
        if dest.is_dir():
            raise OutputError("is a folder; klseg writes a file of that name", path=dest)


def _remove_stale(out: Path) -> None:
    """Staging folders of runs that died without cleaning up (we hold the lock: theirs is
    gone)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(out):
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def _remove_old(out: Path, old: list[str], new: set[str]) -> None:
    """Delete files of the previous report that this one did not write again."""
    emptied = set()
    for name in old:
        if name in new:
            continue
        path = out / name
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):  # never a link or folder put there
                os.unlink(path)
                emptied.update(p for p in Path(name).parents if str(p) != ".")
    for parent in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            (out / parent).rmdir()  # only if empty: someone else's files stay


def publish_report(
    out: Path,
    files: Mapping[str, str | bytes],
    *,
    folders: Mapping[str, Callable[[Path], object]] | None = None,
    also: Mapping[Path, str] | None = None,
) -> list[Path]:
    """Write a report into ``out`` as one unit (see the module docstring).

    ``files`` maps file names in ``out`` to their text (or bytes); ``folders`` maps folder
    names to a function that fills the folder it is given (``{"heatmaps": render}``); ``also`` are
    further outputs outside the report (``--junit``), written under the same lock so they
    match it. Returns the paths written in ``out``.
    """
    out = make_dir(Path(out))
    for name in [*files, *(folders or {})]:
        if Path(name).name != name or name.startswith("."):
            raise UsageError(f"report file name {name!r} must be a plain name")
    with folder_lock(out):
        _remove_stale(out)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        except OSError as err:
            raise output_error(out, err) from None
        try:
            try:
                for name, content in files.items():
                    if isinstance(content, bytes):
                        (staging / name).write_bytes(content)
                    else:
                        (staging / name).write_text(content, encoding="utf-8", newline="")
                for name, fill in (folders or {}).items():
                    (staging / name).mkdir()
                    fill(staging / name)
            except OSError as err:
                raise output_error(out, err) from None
            written = _walk(staging)
            # summary.json (or whatever the caller listed last) goes in last
            order = [n for n in written if n not in files] + [n for n in files if n in written]
            _check_destinations(out, order)
            old = _read_manifest(out)
            with _signals_held() as arrived:
                for name in order:
                    dest = out / name
                    if dest.parent != out:
                        make_dir(dest.parent)
                    install_file(staging / name, dest)
                manifest = json.dumps({"files": written}, indent=1) + "\n"
                write_text(out / MANIFEST_NAME, manifest)
                _remove_old(out, old, set(written))
                for path, text in (also or {}).items():
                    write_text(path, text)
            if arrived:
                raise ReportInterrupted(out, arrived[0])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in written]


def check_distinct_outputs(named: Mapping[str, Path | None], out: Path | None,
                           report_files: Iterable[str]) -> None:  # fmt: skip
    """A UsageError if two outputs are one file, or one is a report file in ``out``.

    ``named`` maps option names (``--junit``) to paths; links are resolved, so a link to
    ``report/summary.json`` counts as ``report/summary.json``.
    """
    seen: dict[Path, str] = {}
    if out is not None:
        for name in report_files:
            seen[_resolved(Path(out) / name)] = f"the report's {name}"
        seen[_resolved(Path(out) / MANIFEST_NAME)] = "the report's manifest"
    for option, path in named.items():
        if path is None:
            continue
        if is_stream(path):
            continue  # /dev/stdout twice is two streams, not one file destroyed
        key = _resolved(Path(path))
        if key in seen:
            raise UsageError(f"{option} {path} is {seen[key]}; give another file name")
        seen[key] = option


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()
