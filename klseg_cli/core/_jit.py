"""numba, where it is installed (``KLSEG_NO_NUMBA`` turns it off), and what every compiled
kernel of ``core`` shares: the package's own cache folder and the fastmath flags. Its own
module so that the kernels (``_fast``, ``_fast_uncertainty``, ``_fast_fit``) build on it
without importing each other in a circle."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

try:  # numba is optional
    if os.environ.get("KLSEG_NO_NUMBA"):
        raise ImportError
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

AVAILABLE = numba is not None
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_numba_cache")
"""The kernels' machine code as shipped: compiled into the package when the wheel is built
(``precompile``, run by setup.py with ``KLSEG_CACHE_INTO_PACKAGE=1``)."""


def runtime_cache_dir() -> str | None:
    """Where a running klseg loads and saves the kernels: a folder of the user's cache
    (``KLSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/klseg`` or ``~/.cache/klseg``), seeded once
    with a copy of the shipped ``CACHE_DIR``. A run never writes into the installed package:
    files numba added there (a new signature's code) were not the install's, and pip left
    them behind on uninstall, a ``klseg_cli/`` folder that hid the next install. The folder's
    name follows the shipped files, so a reinstall seeds a fresh one. None when no folder is
    writable (numba's own locators take over)."""
    shipped = sorted(n for n in os.listdir(CACHE_DIR) if n.endswith((".nbi", ".nbc"))) if (
        os.path.isdir(CACHE_DIR)) else []  # fmt: skip
    stamp = "".join(f"{n}:{os.stat(os.path.join(CACHE_DIR, n)).st_mtime_ns};" for n in shipped)
    tag = hashlib.sha1(f"{CACHE_DIR}|{stamp}".encode()).hexdigest()[:16]
    base = os.environ.get("KLSEG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "klseg",
    )
    target = os.path.join(base, f"numba-{tag}")
    if os.path.isdir(target):
        return target
    try:
        os.makedirs(base, exist_ok=True)
        seed = tempfile.mkdtemp(prefix=".seed-", dir=base)
        for name in shipped:
            shutil.copy2(os.path.join(CACHE_DIR, name), seed)
        try:
            os.rename(seed, target)  # whole, or not at all (another process may have won)
        except OSError:
            shutil.rmtree(seed, ignore_errors=True)
    except OSError:
        return None
    return target if os.path.isdir(target) else None


if AVAILABLE:
    try:
        from numba.core import caching as _caching

        _INTO_PACKAGE = bool(os.environ.get("KLSEG_CACHE_INTO_PACKAGE"))

        class _PackageCacheLocator(_caching.InTreeCacheLocator):
            """numba's in-tree locator with klseg's own folder: the package's cache while
            the build precompiles, else ``runtime_cache_dir()`` (not ``__pycache__``, which
            wheels leave out); where that folder is not writable, numba's other locators
            take over (a user-wide cache)."""

            def __init__(self, py_func, py_file, folder=CACHE_DIR):
                super().__init__(py_func, py_file)
                self._cache_path = folder

            @classmethod
            def from_function(cls, py_func, py_file):
                here = os.path.dirname(os.path.abspath(__file__))
                if os.path.dirname(os.path.abspath(py_file)) != here:
                    return None  # another package's function: numba's own locators
                if not os.path.exists(py_file):
                    return None
                folder = CACHE_DIR if _INTO_PACKAGE else runtime_cache_dir()
                return None if folder is None else cls(py_func, py_file, folder)

        _caching.CacheImpl._locator_classes.insert(0, _PackageCacheLocator)
    except (ImportError, AttributeError):  # pragma: no cover - another numba layout
        pass

FASTMATH = {"reassoc", "contract", "arcp", "afn"}  # no 'nnan'/'ninf': the checks see them
