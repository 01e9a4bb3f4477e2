"""Where a running klseg keeps the compiled kernels: never inside the installed package.

Files that numba adds to the package's cache at run time (code for a signature the build did
not compile) are not the install's: pip left them behind on uninstall, as a ``klseg_cli/``
folder that hid the next install (``ImportError: cannot import name '__version__'``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import NO_NUMBA

pytestmark = pytest.mark.skipif(NO_NUMBA, reason="KLSEG_NO_NUMBA is set")

ROOT = Path(__file__).resolve().parents[2]


def _listing(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_run_compiles_into_the_user_cache_not_the_package(tmp_path):
    pytest.importorskip("numba")
    from klseg_cli.core._jit import CACHE_DIR

    shipped = Path(CACHE_DIR)
    before = _listing(shipped)
    env = {**os.environ, "KLSEG_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    env.pop("KLSEG_CACHE_INTO_PACKAGE", None)
    code = "from klseg_cli.core.precompile import precompile; assert precompile()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    assert _listing(shipped) == before  # nothing added, nothing rewritten
    (folder,) = (tmp_path / "cache").glob("numba-*")
    index = sorted(p.name for p in folder.glob("*.nbi"))
    assert any(n.startswith("_fast._chunk-") for n in index), index
    assert any(n.startswith("_fast_fit.") for n in index), index
    assert not list((tmp_path / "cache").glob(".seed-*"))  # the seed became the folder


def test_the_user_cache_is_seeded_with_the_shipped_kernels(tmp_path, monkeypatch):
    from klseg_cli.core import _jit

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "_fast._chunk-1.py311.nbi").write_bytes(b"index")
    (shipped / "_fast._chunk-1.py311.1.nbc").write_bytes(b"code")
    (shipped / "README").write_text("not numba's")
    monkeypatch.setattr(_jit, "CACHE_DIR", str(shipped))
    monkeypatch.setenv("KLSEG_CACHE_DIR", str(tmp_path / "user"))
    folder = Path(_jit.runtime_cache_dir())
    assert sorted(p.name for p in folder.iterdir()) == [
        "_fast._chunk-1.py311.1.nbc",
        "_fast._chunk-1.py311.nbi",
    ]
    assert _jit.runtime_cache_dir() == str(folder)  # seeded once
    (shipped / "_fast._chunk-1.py311.nbi").write_bytes(b"new index")  # a reinstall
    os.utime(shipped / "_fast._chunk-1.py311.nbi", ns=(1, 1))
    assert _jit.runtime_cache_dir() != str(folder)  # a fresh seed for the new kernels


def test_no_writable_cache_folder_leaves_it_to_numba(tmp_path, monkeypatch):
    from klseg_cli.core import _jit

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KLSEG_CACHE_DIR", str(blocker / "below-a-file"))
    assert _jit.runtime_cache_dir() is None
