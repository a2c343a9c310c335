"""The signed release manifest: the contract between the fleet, which signs it, and the gateway,
which checks it before anything reaches a node (docs/ota.md, "Releases").

A manifest is JSON in its canonical form (keys sorted, no spaces, UTF-8), signed with Ed25519
over exactly those bytes. The fleet hands out the canonical bytes as text and the signature and
public key as base64 (the raw 64 and 32 bytes), so a checker never re-encodes anything.

Needs only the standard library; `verify` imports `cryptography` when called.
"""

import base64
import binascii
import hashlib
import json
import re
from typing import Any

FORMAT = 1  # the manifest's "format": a checker refuses one it does not know
KINDS = ("bundle", "image")
# An image goes to a partition, not the filesystem: its one file is named this, never a path.
IMAGE_FILE = "image.bin"
MAX_FILES = 255  # OTA_OFFER counts its files in one byte (docs/protocol.md)
MAX_PATH_BYTES = 255  # a path is a str8 on the wire (OTA_OFFER)
# A board path's segments: what littlefs and the firmware's module names need, and nothing
# that a shell, a URL or another filesystem reads differently.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that does not parse, does not verify, or breaks a rule above."""


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes that are signed: JSON, keys sorted, no spaces, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def board_path_problem(path: str) -> str | None:
    """Why `path` cannot be a bundle file's place on a board, or None: an absolute path
    (`/lib/node/app.mpy`), segments of letters, digits, '.', '_', '-', no '.' or '..'."""
    if ".." in path.replace("\\", "/").split("/"):
        return f"{path!r} contains '..': give the file's own absolute path"
    if not path.startswith("/"):
        return f"{path!r} is not an absolute board path (like /lib/node/app.mpy)"
    if len(path.encode()) > MAX_PATH_BYTES:
        return f"{path[:40]!r}... is longer than {MAX_PATH_BYTES} bytes"
    for segment in path[1:].split("/"):
        if segment == ".":
            return f"{path!r} contains '.': give the file's own absolute path"
        if not _SEGMENT.match(segment):
            return (f"{path!r}: each part between '/' is letters, digits, '.', '_' or '-', "
                    "not empty and not starting with '.' or '-'")
    return None


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def fingerprint(public_key: str) -> str:
    """16 hex digits naming a public key (base64 of its raw bytes), for logs and people."""
    return hashlib.sha256(base64.b64decode(public_key)).hexdigest()[:16]


def _unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ManifestError(f"{what} is not base64") from exc
    if len(raw) != size:
        raise ManifestError(f"{what} is {len(raw)} bytes, not {size}")
    return raw


def parse(manifest: bytes) -> dict[str, Any]:
    """The manifest's content, after checking its shape; ManifestError if it breaks a rule
    (also when the bytes are not its canonical form, which is what was signed)."""
    try:
        doc = json.loads(manifest.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError("the manifest is not UTF-8 JSON") from exc
    if not isinstance(doc, dict) or canonical(doc) != manifest:
        raise ManifestError("the manifest is not a JSON object in canonical form")
    if doc.get("format") != FORMAT:
        raise ManifestError(f"manifest format {doc.get('format')!r}; this code reads {FORMAT}")
    if doc.get("kind") not in KINDS:
        raise ManifestError(f"unknown release kind {doc.get('kind')!r}")
    files = doc.get("files")
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
        raise ManifestError(f"a manifest lists 1 to {MAX_FILES} files")
    seen = set()
    for entry in files:
        if not isinstance(entry, dict) or set(entry) != {"path", "size", "sha256"} \
                or not isinstance(entry["size"], int) or entry["size"] < 0 \
                or not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            raise ManifestError(f"a file entry is not {{path, size, sha256}}: {entry!r:.100}")
        path = entry["path"]
        problem = (None if path == IMAGE_FILE else "an image's file is " + IMAGE_FILE) \
            if doc["kind"] == "image" else board_path_problem(str(path))
        if problem or path in seen:
            raise ManifestError(problem or f"{path!r} is listed twice")
        seen.add(path)
    if doc["kind"] == "image" and len(files) != 1:
        raise ManifestError("an image release has exactly one file")
    return doc


def verify(manifest: bytes, signature: str, public_key: str) -> dict[str, Any]:
    """The manifest's content if `signature` (base64) is the Ed25519 signature of exactly these
    bytes by `public_key` (base64 of the raw 32 bytes); ManifestError otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(_unb64(public_key, 32, "the public key"))
    try:
        key.verify(_unb64(signature, 64, "the signature"), manifest)
    except InvalidSignature as exc:
        raise ManifestError("the manifest's signature does not verify with the fleet's key") \
            from exc
    return parse(manifest)
