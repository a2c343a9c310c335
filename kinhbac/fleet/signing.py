"""The fleet's release signing key: Ed25519, made on first use, kept in one file of the data
folder that only the service's user may read (`<data dir>/ota-signing-key.pem`, mode 0600).

Whoever holds the private key can make every node in the city run their code, so the file is
created with mode 0600 before a byte of the key is written, and a key file that others may
read or write is refused rather than used. The private key never leaves this module: callers
get signatures and the public key.
"""

import logging
import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kinhbac.fleet.artifacts import fsync_folder
from kinhbac.release_manifest import b64

log = logging.getLogger(__name__)

KEY_FILE = "ota-signing-key.pem"
_LOOSE = stat.S_IRWXG | stat.S_IRWXO  # any access for the group or others


class SigningKeyError(Exception):
    """The key file cannot be used; the message says what the operator should do."""


class ReleaseSigner:
    """Signs release manifests with the key in `path`, made there on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()  # two first uploads at once make one key

    def _private_key(self) -> Ed25519PrivateKey:
        with self._lock:
            if self._key is None:
                self._key = _load_or_create(self.path)
            return self._key

    def public_key(self) -> str:
        """The public key, base64 of its raw 32 bytes (what gateways get in their listing)."""
        raw = self._private_key().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b64(raw)

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of `data` (64 bytes)."""
        return self._private_key().sign(data)


def _load_or_create(path: Path) -> Ed25519PrivateKey:
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    _create(path)
    return _load(path)


def _load(path: Path) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise SigningKeyError(f"the release signing key {path} cannot be opened ({exc}): it "
                              "must be a regular file the service's user owns, mode 0600") \
            from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SigningKeyError(f"the release signing key {path} is not a regular file")
        if info.st_mode & _LOOSE:
            raise SigningKeyError(
                f"the release signing key {path} may be read or changed by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}`, and if anyone "
                "else may have read it, make a new key and release again (docs/ota.md)")
        pem = file.read()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the release signing key {path} is not an unencrypted PEM "
                              "private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the release signing key {path} is not an Ed25519 key")
    return key


def _create(path: Path) -> None:
    """A new key in `path`, atomically: written whole to a temporary file made with mode 0600,
    then linked into place, so that no reader ever sees half a key, and an instance that
    loses a race to create it uses the winner's."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask, before the first byte
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # another instance made it first: its key is the fleet's
        fsync_folder(path.parent)
        log.warning("made the fleet's release signing key %s: back it up with the database; "
                    "every instance of the fleet needs this same file", path)
    finally:
        temporary.unlink(missing_ok=True)

