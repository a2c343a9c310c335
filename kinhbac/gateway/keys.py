"""Where the gateway learns device secrets. One small interface, so that the fleet service can
replace the local key file later without the listener noticing."""

import json
import logging
from pathlib import Path
from typing import Protocol

from kinhbac import wire

log = logging.getLogger(__name__)


class KeyStore(Protocol):
    def lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        """The device's key; None for an unknown device, wire.UNKNOWN_KEY for an unknown key id."""

    def refresh(self) -> None:
        """Pick up changes (called periodically)."""


class KeyFileError(Exception):
    pass


class FileKeyStore:
    """Keys from a JSON file: {"devices": [{"device_id", "key_id", "secret"}]}, hex encoded.

    The file is read again when it changes; a broken file keeps the keys already loaded.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._keys: dict[bytes, wire.Key] = {}
        self._mtime: float | None = None
        self._load()

    def __len__(self) -> int:
        return len(self._keys)

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            doc = json.loads(self.path.read_text())
            keys = {}
            for row in doc["devices"]:
                device_id = bytes.fromhex(row["device_id"])
                keys[device_id] = wire.Key(device_id, int(row["key_id"]),
                                           bytes.fromhex(row["secret"]))
        except FileNotFoundError as exc:
            raise KeyFileError(f"key file {self.path} does not exist") from exc
        except (ValueError, KeyError, TypeError, wire.FrameError) as exc:
            raise KeyFileError(f"key file {self.path} is not valid: {exc}") from exc
        self._keys = keys
        self._mtime = stat.st_mtime

    def refresh(self) -> None:
        try:
            if self.path.stat().st_mtime == self._mtime:
                return
            self._load()
            log.info("reloaded %d device keys from %s", len(self._keys), self.path)
        except (OSError, KeyFileError) as exc:
            log.error("keeping the keys already loaded: %s", exc)

    def lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        key = self._keys.get(device_id)
        if key is None:
            return None
        return key if key.key_id == key_id else wire.UNKNOWN_KEY
