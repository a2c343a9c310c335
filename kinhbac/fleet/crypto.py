"""Secrets at rest: device secrets and site credentials, sealed with the service key.

AES-256-GCM with a key derived (HKDF-SHA256) from KINHBAC_SECRET_KEY. Each blob is bound to
the row it belongs to (the associated data names it), so a ciphertext copied into another
row does not open. The first byte is a format version, for a later change of key or cipher.
"""

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = b"\x01"
_NONCE_SIZE = 12  # the GCM standard; random nonces are safe far beyond this fleet's writes
_INFO = b"kinhbac fleet: secrets at rest v1"


class SecretError(Exception):
    """A sealed secret does not open: another service key, another row, or corrupted."""


class SecretBox:
    """Seals and opens small secrets with a key derived from the service key."""

    def __init__(self, service_key: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
            service_key.encode()
        )
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, *, context: bytes) -> bytes:
        """The encrypted blob for `plaintext`, bound to `context` (what row holds it)."""
        nonce = os.urandom(_NONCE_SIZE)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, context)

    def open(self, blob: bytes, *, context: bytes) -> bytes:
        """The plaintext sealed in `blob` for `context`; SecretError if it does not open."""
        if blob[:1] != _VERSION or len(blob) < 1 + _NONCE_SIZE + 16:
            raise SecretError("not a sealed secret of a known version")
        nonce = blob[1 : 1 + _NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_SIZE :], context)
        except InvalidTag as exc:
            raise SecretError("the sealed secret does not open with this service key") from exc
