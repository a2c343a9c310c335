"""Passwords and bearer tokens.

Passwords are hashed with Argon2id (argon2-cffi's defaults, RFC 9106's low-memory profile).
Tokens are 256 random bits, so a plain SHA-256 of one cannot be reversed by guessing, and it
lets a request find its token with one indexed lookup instead of an Argon2 run per request.
"""

import functools
import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

USER_TOKEN_PREFIX = "kbt_"  # a person's login or API token
GATEWAY_TOKEN_PREFIX = "kbg_"  # a gateway's token
_TOKEN_BYTES = 32

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    # Verifying against this when the e-mail is unknown keeps login time the same either way.
    return _hasher.hash("no such user")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True if `password` matches; takes as long for an unknown user (hash None)."""
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


def new_token(prefix: str) -> str:
    """A fresh bearer token; the prefix says what kind of principal it authenticates."""
    return prefix + secrets.token_urlsafe(_TOKEN_BYTES)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
