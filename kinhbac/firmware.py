"""The node's files as they sit on a board's filesystem: what the emulator's launcher, the
technician's flash tool and (later) OTA put there. One place decides the layout."""

import json
import subprocess
import tempfile
from pathlib import Path

from kinhbac import wire

REPO = Path(__file__).resolve().parent.parent
FIRMWARE_DIR = REPO / "firmware"
CONFIG_PATH = "/config.json"


def firmware_files(firmware_dir: Path = FIRMWARE_DIR, compiled: bool = True) -> dict[str, bytes]:
    """Board path -> contents: boot.py and main.py at the root, the app and codec in /lib.

    With `compiled`, the modules in /lib go as .mpy bytecode from mpy-cross: a board then needs
    no heap to compile them at import (about as much as the app uses while running), as when
    they are frozen into the image.
    """
    if not (firmware_dir / "main.py").exists():
        raise FileNotFoundError(
            f"no firmware in {firmware_dir}: run from a Kinhbac checkout (the firmware files are "
            "not part of the installed package yet)"
        )
    files = {
        "/boot.py": (firmware_dir / "boot.py").read_bytes(),
        "/main.py": (firmware_dir / "main.py").read_bytes(),
        "/lib/wire.py": Path(wire.__file__).read_bytes(),
    }
    for source in sorted((firmware_dir / "node").glob("*.py")):
        files[f"/lib/node/{source.name}"] = source.read_bytes()
    if compiled:
        files = {
            (path[:-3] + ".mpy" if path.startswith("/lib/") else path): (
                compile_mpy(data, path) if path.startswith("/lib/") else data
            )
            for path, data in files.items()
        }
    return files


def compile_mpy(source: bytes, name: str) -> bytes:
    """MicroPython bytecode for one module, from mpy-cross."""
    from kinhbac.emulator.interpreter import find_mpy_cross

    with tempfile.TemporaryDirectory(prefix="kb-mpy-") as tmp:
        src = Path(tmp) / Path(name).name
        src.write_bytes(source)
        out = src.with_suffix(".mpy")
        done = subprocess.run(
            [find_mpy_cross(), "-s", name, "-o", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mpy-cross could not compile {name}: {done.stderr.strip()}")
        return out.read_bytes()


def config_file(config: dict) -> dict[str, bytes]:
    """The node's configuration file, ready to write next to the firmware."""
    return {CONFIG_PATH: json.dumps(config, indent=1, sort_keys=True).encode()}
