"""Releases: what an admin uploads, checked, kept, signed and recorded (docs/ota.md, "Releases").

A release is a kind (bundle or image), a version and its files. What a board cannot take is
refused at upload, by name: an image larger than the OTA slot or a bundle larger than the
filesystem of the boards' flash layout, a bundle path that is not an absolute board path, a
version that is not a version or is released already. What is kept: the files by SHA-256
(kinhbac/fleet/artifacts.py), and the canonical manifest with its Ed25519 signature
(kinhbac/fleet/signing.py, kinhbac/release_manifest.py).
"""

import logging
import math
import uuid
from datetime import datetime

from packaging.utils import canonicalize_version
from packaging.version import InvalidVersion, Version
from sqlmodel import Session, select

from kinhbac import release_manifest, wire
from kinhbac.device import partitions
from kinhbac.fleet import audit
from kinhbac.fleet.artifacts import ArtifactStore
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.errors import Conflict, Invalid, Unavailable
from kinhbac.fleet.models import (
    Page,
    Release,
    ReleaseDetail,
    ReleaseFile,
    ReleaseKind,
    ReleasePublic,
    utcnow,
)
from kinhbac.fleet.signing import ReleaseSigner, SigningKeyError
from kinhbac.release_manifest import fingerprint
from kinhbac.fleet.store import commit, get_or_404, page
from kinhbac.fleet.uploads import Upload, UploadRefused

log = logging.getLogger(__name__)

# The flash layout releases are sized against: the one the fleet's boards run (docs/emulator.md,
# "Flash"). Boards record no table of their own yet; when they do, a rollout checks each.
LAYOUT_NAME = "ESP32_GENERIC-OTA"
LAYOUT = partitions.ESP32_GENERIC_OTA
SLOT_BYTES = min(slot.size for slot in partitions.ota_slots(LAYOUT))  # 0x180000: 1.5 MiB
_FILESYSTEM = partitions.filesystem(LAYOUT)
assert _FILESYSTEM is not None
FILESYSTEM_BYTES = _FILESYSTEM.size  # 0xF0000: 960 KiB
LITTLEFS_BLOCK = 4096  # MicroPython's littlefs block on the ESP32: a file takes whole blocks
# Characters (PEP 440 versions are ASCII): a node's HELLO reserves room for a firmware version
# of 32 bytes beside its sensor table (firmware/node/table.py, _HELLO_TABLE_MAX), so a longer
# one could leave a node with a full sensor table unable to introduce itself after the update.
MAX_VERSION = 32

# ESP-IDF's app image header starts with this byte (esp_image_header_t.magic); the bootloader
# refuses to boot anything else, so an image without it could only roll back.
IMAGE_MAGIC = 0xE9
# MicroPython's firmware.bin puts bootloader, partition table and app together for 0x1000:
# its table then sits at 0x8000 - 0x1000. That is for esptool, not for an OTA slot.
_COMBINED_TABLE_AT = partitions.TABLE_OFFSET - 0x1000
_TABLE_MAGIC = b"\xaa\x50"

# Only to measure an offer with the wire codec: never sent, so any key does.
_NO_KEY = wire.Key(bytes(wire.DEVICE_ID_SIZE), 1, bytes(16))
_WIRE_KIND = {ReleaseKind.bundle: wire.OTA_BUNDLE, ReleaseKind.image: wire.OTA_IMAGE}

FIELDS = frozenset({"kind", "version"})
FILE_FIELD = "file"


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 1024 / 1024:.2f} MiB)" if n >= 1024 * 1024 else f"{n:,} bytes"


def check_part(fields: dict[str, str], name: str, size: int) -> None:
    """While a file arrives: refuse it at the first byte past what its kind can hold, so a
    too-large image is not received whole (the kind comes first from the CLI and the console;
    when it comes after the files, the same checks run once it has)."""
    kind = fields.get("kind")
    if kind == ReleaseKind.image and size > SLOT_BYTES:
        raise UploadRefused(422, FILE_FIELD, _image_too_large(size, finished=False))
    if kind == ReleaseKind.bundle and size > FILESYSTEM_BYTES:
        raise UploadRefused(422, FILE_FIELD, f"{name}: larger than the filesystem of "
                            f"{LAYOUT_NAME} boards ({_size(FILESYSTEM_BYTES)})")


def _image_too_large(size: int, *, finished: bool) -> str:
    slots = (f"each OTA slot (ota_0, ota_1) of {LAYOUT_NAME}'s partition table holds "
             f"{_size(SLOT_BYTES)}")
    if finished:
        return f"the image is larger than the OTA slot: it is {_size(size)}, and {slots}"
    return f"the image is larger than the OTA slot: {slots}, and it went on past that"


def image_fit_problem(size: int) -> str | None:
    """Why an image of `size` bytes cannot go to the boards' OTA slot, or None: the upload's
    check, and the console's explanation of a release's fit."""
    return _image_too_large(size, finished=True) if size > SLOT_BYTES else None


def parse_version(text: str | None) -> tuple[str, str]:
    """The version as packaging normalises it (what the manifest says) and its canonical key
    (1.0 and 1.0.0 are one version); Invalid naming `version` otherwise."""
    if not text or not text.strip():
        raise Invalid("version", "give the release's version, e.g. 0.2.0")
    if len(text) > MAX_VERSION:
        raise Invalid("version", f"a version is at most {MAX_VERSION} characters")
    try:
        version = Version(text)
    except InvalidVersion:
        raise Invalid("version", f"{text!r} is not a version (PEP 440, e.g. 0.2.0, 1.0.0rc1)") \
            from None
    if len(str(version)) > MAX_VERSION:
        raise Invalid("version", f"{text!r} is {version} written out: more than {MAX_VERSION} "
                      "characters")
    return str(version), canonicalize_version(version)


def _kind(text: str | None) -> ReleaseKind:
    try:
        return ReleaseKind(text or "")
    except ValueError:
        raise Invalid("kind", f"the kind is bundle or image, not {text!r}" if text else
                      "give the release's kind: bundle or image") from None


def _check_image(upload: Upload) -> None:
    if len(upload.files) != 1:
        raise Invalid(FILE_FIELD, f"an image release is one file; this upload has "
                      f"{len(upload.files)}")
    [image] = upload.files
    if image.size == 0:
        raise Invalid(FILE_FIELD, "the image is empty")
    problem = image_fit_problem(image.size)
    if problem:
        raise Invalid(FILE_FIELD, problem)
    image.incoming.finish()
    with open(image.incoming.path, "rb") as file:
        first = file.read(1)
        file.seek(_COMBINED_TABLE_AT)
        table = file.read(len(_TABLE_MAGIC))
    if first[0] != IMAGE_MAGIC:
        raise Invalid(FILE_FIELD, f"not an ESP32 app image (it starts with {first[0]:#04x}, an "
                      f"app image with {IMAGE_MAGIC:#04x}): upload the build's micropython.bin")
    if table == _TABLE_MAGIC:
        raise Invalid(FILE_FIELD, "this is a whole-flash image (bootloader, partition table "
                      "and app, MicroPython's firmware.bin for esptool), not an app: upload the "
                      "build's micropython.bin")


def _check_bundle(upload: Upload) -> None:
    seen: set[str] = set()
    for received in upload.files:
        problem = release_manifest.board_path_problem(received.name)
        if problem:
            raise Invalid(FILE_FIELD, problem)
        if received.name in seen:
            raise Invalid(FILE_FIELD, f"{received.name} is given twice")
        seen.add(received.name)
    needed = min_free_bytes(upload)
    if needed > FILESYSTEM_BYTES:
        raise Invalid(FILE_FIELD, f"the bundle's files take {_size(needed)} in littlefs "
                      f"blocks; the filesystem of {LAYOUT_NAME} boards is "
                      f"{_size(FILESYSTEM_BYTES)}")


def _check_offer(kind: ReleaseKind, version: str, upload: Upload) -> None:
    """Refuse a release whose OTA_OFFER would not fit one frame: a node is offered a release in
    one, so such a release could never be installed. The wire codec decides."""
    paths = [release_manifest.IMAGE_FILE if kind == ReleaseKind.image else f.name
             for f in upload.files]
    try:
        wire.encode_ota_offer(_NO_KEY, 1, 1, 0, _WIRE_KIND[kind], version,
                              [(path, f.size, bytes(32)) for path, f in zip(paths, upload.files,
                                                                             strict=True)])
    except wire.FrameError:
        # The rules above leave only its size to refuse: a payload's bytes (docs/protocol.md).
        size = 7 + len(version.encode()) + sum(37 + len(p.encode()) for p in paths)
        raise Invalid(FILE_FIELD, f"the release's OTA_OFFER would take {size:,} bytes and a "
                      f"frame carries {wire.MAX_PAYLOAD:,}: a node could never be offered it; "
                      "send fewer files or shorter paths") from None


def min_free_bytes(upload: Upload) -> int:
    """What a bundle's files take on the node's filesystem: whole littlefs blocks, one at
    least for each file."""
    return sum(max(1, math.ceil(f.size / LITTLEFS_BLOCK)) * LITTLEFS_BLOCK for f in upload.files)


def _already(session: Session, kind: ReleaseKind, version_key: str) -> Release | None:
    return session.exec(select(Release).where(Release.kind == kind,
                                              Release.version_key == version_key)).first()


def public_key(session: Session) -> str | None:
    """The key the newest release was signed with (what gateways verify with); None before
    the first release."""
    return session.exec(
        select(Release.signing_key).order_by(Release.created_at.desc(), Release.id).limit(1)
    ).first()


def _signing_key(session: Session, signer: ReleaseSigner) -> str:
    """This instance's public key, once it is known to be the fleet's."""
    try:
        mine = signer.public_key()
    except SigningKeyError as exc:
        log.error("cannot sign releases: %s", exc)
        raise Unavailable(f"the fleet cannot sign releases: {exc}") from exc
    fleets = public_key(session)
    if fleets is not None and fleets != mine:
        log.error("this instance's release signing key %s (%s) is not the fleet's (%s)",
                  signer.path, fingerprint(mine), fingerprint(fleets))
        raise Unavailable(
            f"this instance's release signing key ({signer.path}, {fingerprint(mine)}) is not "
            f"the one the fleet's releases are signed with ({fingerprint(fleets)}): every "
            "instance needs the same key file; copy it from the instance that made it")
    return mine


def _manifest(kind: ReleaseKind, version: str, created: datetime, files: list[ReleaseFile],
              upload: Upload) -> dict[str, object]:
    manifest: dict[str, object] = {
        "format": release_manifest.FORMAT,
        "kind": kind.value,
        "version": version,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),  # to the second
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
    }
    if kind == ReleaseKind.bundle:
        manifest["min_free_bytes"] = min_free_bytes(upload)
    return manifest


def create_release(session: Session, store: ArtifactStore, signer: ReleaseSigner, actor: Actor,
                   upload: Upload) -> ReleaseDetail:
    """Check an upload, keep its files, sign its manifest and record it, audited; the files
    stay in `upload` (the caller discards what was not kept)."""
    kind = _kind(upload.fields.get("kind"))
    version, version_key = parse_version(upload.fields.get("version"))
    if not upload.files:
        raise Invalid(FILE_FIELD, "no files: send the image, or the bundle's files each with "
                      "its board path as its file name")
    if kind == ReleaseKind.image:
        _check_image(upload)
    else:
        _check_bundle(upload)
    _check_offer(kind, version, upload)
    taken = _already(session, kind, version_key)
    if taken is not None:
        raise Conflict(_taken(taken))
    signing_key = _signing_key(session, signer)

    files = []
    for position, received in enumerate(upload.files):
        digest = store.keep(received.incoming)  # on disk before the release refers to it
        path = release_manifest.IMAGE_FILE if kind == ReleaseKind.image else received.name
        files.append(ReleaseFile(position=position, path=path, size=received.size,
                                 sha256=digest))
    created = utcnow()
    manifest = release_manifest.canonical(_manifest(kind, version, created, files, upload))
    release = Release(
        id=uuid.uuid4(), kind=kind, version=version, version_key=version_key,
        created_at=created, uploaded_by=actor.label, uploaded_by_id=actor.id,
        size=sum(f.size for f in files), manifest=manifest, signature=signer.sign(manifest),
        signing_key=signing_key, file_rows=files)
    session.add(release)
    audit.record(session, actor, "release.upload", "release", release.id,
                 after=audit.snapshot(release, ReleasePublic))
    commit(session, f"{kind.value} {version} was released meanwhile")
    session.refresh(release)
    log.info("%s released %s %s (%d files, %d bytes)", actor.label, kind.value, version,
             len(files), release.size)
    return detail(release)


def _taken(release: Release) -> str:
    return (f"{release.kind.value} {release.version} is released already (release {release.id}"
            f", {release.created_at:%Y-%m-%d %H:%M} UTC by {release.uploaded_by}): give this "
            "one a new version")


def detail(release: Release) -> ReleaseDetail:
    return ReleaseDetail.model_validate(release, update={
        "manifest": release.manifest.decode("utf-8"),
        "signature": release_manifest.b64(release.signature),
    })


def get_release(session: Session, release_id: uuid.UUID) -> Release:
    return get_or_404(session, Release, release_id, "release")


def version_key(text: str) -> str:
    """The canonical key of a version (1.0 and 1.0.0 have one); ValueError if not a version."""
    try:
        return canonicalize_version(Version(text))
    except InvalidVersion:
        raise ValueError(f"{text!r} is not a version (PEP 440, e.g. 0.2.0)") from None


def list_releases(session: Session, *, kind: ReleaseKind | None, version_key: str | None,
                  limit: int, offset: int) -> Page[ReleasePublic]:
    """Releases, newest first; `version_key` (version_key()) matches 1.0 to 1.0.0."""
    query = select(Release)
    if kind is not None:
        query = query.where(Release.kind == kind)
    if version_key is not None:
        query = query.where(Release.version_key == version_key)
    return page(session, query, ReleasePublic, order_by=(Release.created_at.desc(), Release.id),
                limit=limit, offset=offset)
