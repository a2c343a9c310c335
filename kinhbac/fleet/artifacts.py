"""Where release files are kept: on disk under the fleet's data folder, named by their SHA-256.

    <data dir>/releases/sha256/9f/9f86d0...   a file's bytes, written once, never changed
    <data dir>/releases/incoming/             uploads being received (same filesystem: a rename)

A file is written whole to `incoming/`, fsynced, then renamed to its name, so a reader never
sees part of one, and the same bytes uploaded twice are kept once. This module is the only one
that knows where the bytes live: S3-compatible storage (DESIGN.md, principle 9) would be
another class with the same methods (serving a file by a signed URL rather than local_path).
"""

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import BinaryIO

# An upload left behind by a crashed instance is removed when a later one starts; one that old
# is not still arriving (the request's own limits end it long before).
_STALE_INCOMING_S = 24 * 3600


class Incoming:
    """A file being received: written in order, hashed as it goes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = open(path, "xb")  # noqa: SIM115 (closed by finish/discard)

    def write(self, data: bytes) -> None:
        assert self._file is not None, "written after finish() or discard()"
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and fsync: the bytes are on disk when this returns."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


class ArtifactStore:
    """Content-addressed files under `root`. Every method blocks: call from a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder

    def incoming(self) -> Incoming:
        """A new file to receive an upload into; keep() it or discard() it."""
        folder = self._folder("incoming")
        return Incoming(folder / f"{secrets.token_hex(16)}.part")

    def keep(self, incoming: Incoming) -> str:
        """Move a received file to its name (its SHA-256), durably; returns the SHA-256."""
        incoming.finish()
        digest = incoming.sha256
        final = self._folder("sha256") / digest[:2] / digest
        final.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(incoming.path, final)  # the same bytes may be there already: no harm
        fsync_folder(final.parent)
        return digest

    def has(self, sha256: str) -> bool:
        return self.local_path(sha256).is_file()

    def local_path(self, sha256: str) -> Path:
        """The file holding the bytes whose SHA-256 is `sha256` (served as a file)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 in hex: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def purge_stale_incoming(self) -> int:
        """Remove uploads a crashed instance left in `incoming/`; how many were removed."""
        folder = self.root / "incoming"
        if not folder.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - _STALE_INCOMING_S
        for leftover in folder.iterdir():
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another instance removed it
        return removed


def fsync_folder(folder: Path) -> None:
    """Make a rename or link in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
