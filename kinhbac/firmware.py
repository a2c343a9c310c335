"""The node's files as they sit on a board's filesystem: what the emulator's launcher, the
technician's flash tool and (later) OTA put there. One place decides the layout."""

import json
from pathlib import Path

from kinhbac import wire

REPO = Path(__file__).resolve().parent.parent
FIRMWARE_DIR = REPO / "firmware"
CONFIG_PATH = "/config.json"


def firmware_files(firmware_dir: Path = FIRMWARE_DIR) -> dict[str, bytes]:
    """Board path -> contents: boot.py and main.py at the root, the app and codec in /lib."""
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
    return files


def config_file(config: dict) -> dict[str, bytes]:
    """The node's configuration file, ready to write next to the firmware."""
    return {CONFIG_PATH: json.dumps(config, indent=1, sort_keys=True).encode()}
