"""numba, where it is installed (``KLSEG_NO_NUMBA`` turns it off), and what every compiled
kernel of ``core`` shares: the package's own cache folder and the fastmath flags. Its own
module so that the kernels (``_fast``, ``_fast_uncertainty``, ``_fast_fit``) build on it
without importing each other in a circle."""

from __future__ import annotations

import os

try:  # numba is optional
    if os.environ.get("KLSEG_NO_NUMBA"):
        raise ImportError
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

AVAILABLE = numba is not None
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_numba_cache")
"""Where numba caches the kernel's machine code: inside the package, so that the cache
compiled when the wheel is built (``precompile``, run by setup.py) ships with it."""

if AVAILABLE:
    try:
        from numba.core import caching as _caching

        class _PackageCacheLocator(_caching.InTreeCacheLocator):
            """numba's in-tree locator with the package's own cache folder (not
            ``__pycache__``, which wheels leave out); when that folder is not writable,
            numba's other locators take over (a user-wide cache)."""

            def __init__(self, py_func, py_file):
                super().__init__(py_func, py_file)
                self._cache_path = CACHE_DIR

            @classmethod
            def from_function(cls, py_func, py_file):
                here = os.path.dirname(os.path.abspath(__file__))
                if os.path.dirname(os.path.abspath(py_file)) != here:
                    return None  # another package's function: numba's own locators
                return super().from_function(py_func, py_file)

        _caching.CacheImpl._locator_classes.insert(0, _PackageCacheLocator)
    except (ImportError, AttributeError):  # pragma: no cover - another numba layout
        pass

FASTMATH = {"reassoc", "contract", "arcp", "afn"}  # no 'nnan'/'ninf': the checks see them
