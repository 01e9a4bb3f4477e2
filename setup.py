"""Build hook: compile the numba kernel into the package's cache while building the wheel.

Everything else is in pyproject.toml. After the usual build_py,
``python -m klseg_cli.core.precompile`` runs against the built copy, so numba writes its
compiled code into the built package's ``__pycache__`` (shipped in the wheel): a fresh
install then loads machine code instead of compiling on its first large map. Numba uses
the cache only when this file's contents, its own version and the CPU match, and compiles
afresh otherwise; if the step fails (no numba in the build environment, no writable build
folder), the build goes on without a cache.
"""

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernelCache(build_py):
    def run(self):
        super().run()
        if os.environ.get("KLSEG_NO_PRECOMPILE"):
            return
        env = {**os.environ, "PYTHONPATH": os.path.abspath(self.build_lib)}
        env.pop("NUMBA_CACHE_DIR", None)  # the cache must land beside the built sources
        env["KLSEG_CACHE_INTO_PACKAGE"] = "1"  # (a run of klseg uses a user cache folder)
        result = subprocess.run(
            [sys.executable, "-m", "klseg_cli.core.precompile"],
            env=env,
            capture_output=True,
            text=True,
        )
        message = (result.stdout or result.stderr).strip().splitlines()
        print(f"klseg: {message[-1] if message else 'kernel not precompiled'}")


setup(cmdclass={"build_py": BuildPyWithKernelCache})
