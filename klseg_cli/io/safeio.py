"""Reading files that other people's pipelines made, without trusting them.

- ``check_regular``: a FIFO, ``/dev/zero`` or a socket given as a file is refused at once,
  never opened for reading (a FIFO would block forever, ``/dev/zero`` never ends).
- ``read_small``: class-name lists, summaries and baselines are small; a file over
  ``SMALL_FILE_LIMIT`` is refused instead of being read until memory runs out.
- ``pread_exact`` / ``read_npy``: whole-file reads through ``os.pread`` instead of a memory
  map. A mapped file truncated by another process kills the reader with SIGBUS when it
  touches a page past the new end; ``pread`` returns short instead, which becomes the
  error "file ended early".

Every problem is a ``ReadError`` (or ``InputError``) naming the file: exit 2, one line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import InputError, ReadError

SMALL_FILE_LIMIT = 256 << 20
"""Largest class-names, summary or baseline file klseg reads (256 MiB)."""


def _why(err: OSError) -> str:
    return err.strerror or str(err)


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a folder, not a file (a report's file is DIR/summary.json)"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def exists(path: Path | str, error: type[InputError] = InputError) -> bool:
    """Whether ``path`` exists; a folder we may not look into is an error, not "no"."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as err:
        raise error(f"cannot read: {_why(err)}", path=path) from None
    return True


def check_regular(path: Path | str, error: type[InputError] = ReadError) -> os.stat_result:
    """The ``stat`` of ``path`` (links followed) when it is a regular file; else an error."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error("no such file", path=path) from None
    except OSError as err:
        raise error(f"cannot read: {_why(err)}", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(_kind_of(st.st_mode), path=path)
    return st


def open_regular(path: Path | str, error: type[InputError] = ReadError) -> int:
    """A read-only descriptor of the regular file ``path``.

    Opened with O_NONBLOCK, so a FIFO swapped in after ``check_regular`` cannot block us;
    the type is checked again on the open descriptor (no race between check and open).
    """
    check_regular(path, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise error(f"cannot read: {_why(err)}", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(_kind_of(st.st_mode), path=path)
    return fd


def read_small(
    path: Path | str,
    *,
    what: str = "file",
    limit: int = SMALL_FILE_LIMIT,
    error: type[InputError] = InputError,
) -> bytes:
    """The bytes of a small regular file; refuses special files and files over ``limit``."""
    fd = open_regular(path, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(
                f"is {size:,} bytes, more than a {what} can sensibly be "
                f"({limit >> 20} MiB); is it the right file?",
                path=path,
            )
        parts, total = [], 0
        while True:  # read to the end, but never past the limit if the file grows
            block = os.read(fd, 1 << 20)
            if not block:
                break
            total += len(block)
            if total > limit:
                raise error(f"grew past {limit >> 20} MiB while being read", path=path)
            parts.append(block)
        return b"".join(parts)
    except OSError as err:
        raise error(f"cannot read: {_why(err)}", path=path) from None
    finally:
        os.close(fd)


def read_small_text(path: Path | str, *, what: str = "file", error=InputError) -> str:
    """``read_small`` decoded as UTF-8 (a BOM is dropped)."""
    data = read_small(path, what=what, error=error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"is not UTF-8 text (byte {err.start})", path=path) from None


def pread_exact(fd: int, offset: int, out: np.ndarray, path: Path | str) -> None:
    """Fill the contiguous array ``out`` with the bytes at ``offset``, or raise ReadError."""
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as err:
            raise ReadError(f"cannot read: {_why(err)}", path=path) from None
        if n == 0:
            raise ReadError("file ended early: it was truncated while being read", path=path)
        got += n


def parse_npy_header(fh, path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of the .npy header at the start of the
    binary file object ``fh`` (a file, or bytes read from a URL), without unpickling; a
    damaged header is a ReadError naming ``path``."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except OSError as err:
        raise ReadError(f"cannot read: {_why(err)}", path=path) from None
    except Exception as err:  # NumPy raises a zoo of errors on damaged headers
        raise ReadError(f"not a valid .npy file ({err})", path=path) from None
    return tuple(shape), np.dtype(dtype), bool(fortran), fh.tell()


def npy_header(fd: int, path: Path | str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of the .npy open as ``fd``."""
    with os.fdopen(os.dup(fd), "rb") as fh:
        return parse_npy_header(fh, path)


def read_npy(path: Path | str, *, check_shape=None) -> np.ndarray:
    """A whole .npy read into memory with ``pread`` (labels: small and read whole anyway).

    The size is checked against the header first, and a file that shrinks during the read
    is "file ended early", never a SIGBUS. Object arrays are refused without unpickling.
    ``check_shape(shape)`` may raise to refuse a header before anything is allocated.
    """
    fd = open_regular(path)
    try:
        shape, dtype, fortran, offset = npy_header(fd, path)
        if dtype.hasobject:
            raise ReadError(
                "holds Python objects; klseg never unpickles files, save a numeric array",
                path=path,
            )
        if check_shape is not None:
            check_shape(shape)
        count = math.prod(shape)
        expected = offset + count * dtype.itemsize
        actual = os.fstat(fd).st_size
        if actual < expected:
            raise ReadError(
                f"is truncated: its header promises shape {shape} ({expected:,} bytes) but "
                f"the file has {actual:,} bytes",
                path=path,
            )
        stored = shape[::-1] if fortran else shape
        out = np.empty(stored, dtype=dtype)
        pread_exact(fd, offset, out, path)
        return out.T if fortran else out
    finally:
        os.close(fd)


def _describe_oserror(err: OSError) -> str:
    return err.strerror or str(err)


def _check_size(shape: tuple[int, ...], path: Path, max_pixels: int) -> None:
    """Refuse, from the header alone, an image whose H × W (its two largest axes) is absurd."""
    pixels = math.prod(sorted(shape)[-2:])
    if pixels > max_pixels:
        raise ReadError(
            f"header claims shape {tuple(shape)}, {pixels:,} pixels, more than --max-pixels "
            f"{max_pixels:,}; raise --max-pixels if the file is genuine",
            path=path,
        )


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs warnings about damaged files on stderr; klseg reports one error instead."""
    logger = logging.getLogger("tifffile")
    saved = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(saved)
