"""The gateway's release cache: each release a rollout assigns to the site's nodes, fetched
from the fleet once, checked, and kept on disk within a size limit (docs/ota.md, "The
gateway's part").

A release is fetched as `GET /api/gateway/releases/{id}` (the canonical manifest and its
signature) and `GET /api/gateway/releases/{id}/files/{index}`. Nothing reaches a node before:
- the manifest's Ed25519 signature verifies with the listing's `release_public_key`
  (`release_manifest.verify`, which also checks the manifest's shape);
- the manifest's SHA-256 is the assignment's `manifest_sha256`;
- every file has the size and SHA-256 the manifest gives it.
A release that fails one of them is refused (ReleaseRefused, with the reason): it is never
offered. A release larger than the whole cache is refused the same way. A fleet that cannot be
reached, or a download cut on the way, is not a refusal (FetchError): the next round goes on
from the bytes already on disk, with a Range request.

On disk, under the cache folder:

    incoming/<manifest sha256>/<index>.part   a file being downloaded (resumed from its size)
    incoming/<manifest sha256>/<index>        a file downloaded and checked
    releases/<manifest sha256>/release.json   the signed manifest as fetched: written last
    releases/<manifest sha256>/<index>        the release's files, by their index

A release moves from incoming/ to releases/ by one rename once every file is checked and
fsynced, so after a power cut a release is in the cache whole or not at all. Nothing is
fetched again after a restart: the release ref (the first 4 bytes of the manifest's SHA-256) is
the same, so a node resumes where it stopped.

The limit counts the files' bytes. To make room for a release, the least recently offered
releases that no assignment needs are deleted; when the assigned ones alone leave no room, the
new one waits (CacheFull) for an assignment to end.

Chunks are read with one pread of at most 1 KiB on the event loop, from file handles kept
open (a few at most): a read that small from the page cache takes microseconds, and a node's
request names any offset, so there is nothing to read ahead.
"""

import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kinhbac import release_manifest, wire
from kinhbac.gateway.keys import FetchError

log = logging.getLogger(__name__)

RELEASES = "releases"
INCOMING = "incoming"
RELEASE_FILE = "release.json"
DOWNLOAD_BLOCK = 64 * 1024  # bytes read from the fleet, hashed and written at a time
OPEN_FILES = 16  # file handles kept open for chunk reads (a site updates a few releases)
OFFERED_TOUCH_S = 600.0  # "last offered" reaches the disk at most this often per release
KINDS = {"bundle": wire.OTA_BUNDLE, "image": wire.OTA_IMAGE}


class Fleet(Protocol):
    """What the cache needs of the fleet client (keys.FleetKeyStore)."""

    def open(self, path: str, headers: dict[str, str] | None = None) -> Any: ...

    def get_json(self, path: str) -> Any: ...


class ReleaseRefused(Exception):
    """The release fails a check (signature, manifest hash, file hash, size): never offered.
    str() is the reason, for the log and the `failed` progress of its devices."""


class CacheFull(Exception):
    """No room now: the releases that assignments still need fill the cache."""


def release_ref(manifest_sha256: str) -> int:
    """The release ref on the wire: the manifest's SHA-256's first 4 bytes, big-endian."""
    return int(manifest_sha256[:8], 16)


@dataclass(frozen=True)
class CachedFile:
    path: str
    size: int
    sha256: bytes


@dataclass
class CachedRelease:
    """A release in the cache, checked: what an offer says and where its files are."""

    manifest_sha256: str
    release_id: str
    kind: str
    version: str
    files: list[CachedFile]
    folder: Path
    offered_at: float  # time.time() it was last offered (or cached)

    @property
    def ref(self) -> int:
        return release_ref(self.manifest_sha256)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def wire_kind(self) -> int:
        return KINDS[self.kind]

    def offer_files(self) -> list[tuple[str, int, bytes]]:
        return [(f.path, f.size, f.sha256) for f in self.files]


def _release_from(folder: Path, doc: dict[str, Any], manifest: dict[str, Any],
                  offered_at: float) -> CachedRelease:
    files = [CachedFile(f["path"], f["size"], bytes.fromhex(f["sha256"]))
             for f in manifest["files"]]
    return CachedRelease(folder.name, str(doc["id"]), manifest["kind"], manifest["version"],
                         files, folder, offered_at)


class ReleaseCache:
    """Releases on disk, by manifest SHA-256. load() once, then fetch() (blocking: on a thread)
    and the lookups and chunk reads (on the event loop)."""

    def __init__(self, folder: Path, limit_bytes: int) -> None:
        self.folder = Path(folder)
        self.limit_bytes = limit_bytes
        self.releases: dict[str, CachedRelease] = {}  # manifest sha256 -> release
        self._by_ref: dict[int, CachedRelease] = {}
        self._handles: OrderedDict[tuple[str, int], int] = OrderedDict()  # -> fd
        self._touched: dict[str, float] = {}  # monotonic time offered_at was last written

    # ----- start-up -----

    def load(self) -> None:
        """The releases already on disk (blocking, at start-up). A release folder that does
        not hold what its manifest lists (a card that lost a file) is deleted and fetched
        again."""
        (self.folder / RELEASES).mkdir(parents=True, exist_ok=True)
        (self.folder / INCOMING).mkdir(parents=True, exist_ok=True)
        for folder in sorted((self.folder / RELEASES).iterdir()):
            try:
                doc = json.loads((folder / RELEASE_FILE).read_text())
                manifest = release_manifest.parse(doc["manifest"].encode())
                release = _release_from(folder, doc, manifest,
                                        (folder / RELEASE_FILE).stat().st_mtime)
                for index, entry in enumerate(release.files):
                    if (folder / str(index)).stat().st_size != entry.size:
                        raise ValueError(f"file {index} is not {entry.size} bytes")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("cached release %s is unusable, deleted (fetched again if still "
                          "assigned): %s", folder.name, exc)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._add(release)
        if self.releases:
            log.info("OTA cache %s: %d releases, %d of %d bytes", self.folder,
                     len(self.releases), self.used_bytes(), self.limit_bytes)

    def _add(self, release: CachedRelease) -> None:
        self.releases[release.manifest_sha256] = release
        self._by_ref[release.ref] = release

    # ----- lookups (event loop) -----

    def get(self, manifest_sha256: str) -> CachedRelease | None:
        return self.releases.get(manifest_sha256)

    def used_bytes(self) -> int:
        return sum(r.size for r in self.releases.values())

    def mark_offered(self, release: CachedRelease) -> None:
        """Least recently offered goes first: remember this offer (on disk now and then, as
        release.json's modification time, so that it survives a restart)."""
        release.offered_at = time.time()
        now = time.monotonic()
        if now - self._touched.get(release.manifest_sha256, -OFFERED_TOUCH_S) >= OFFERED_TOUCH_S:
            self._touched[release.manifest_sha256] = now
            with contextlib.suppress(OSError):  # only the eviction order suffers
                os.utime(release.folder / RELEASE_FILE)

    def read(self, release: CachedRelease, index: int, offset: int, length: int) -> bytes:
        """Up to `length` bytes of file `index` at `offset` (the caller checked both)."""
        key = (release.manifest_sha256, index)
        fd = self._handles.get(key)
        if fd is None:
            fd = os.open(release.folder / str(index), os.O_RDONLY)
            self._handles[key] = fd
            while len(self._handles) > OPEN_FILES:
                _, oldest = self._handles.popitem(last=False)
                os.close(oldest)
        else:
            self._handles.move_to_end(key)
        return os.pread(fd, length, offset)

    def close(self) -> None:
        while self._handles:
            os.close(self._handles.popitem()[1])

    # ----- making room (event loop) -----

    def make_room(self, manifest_sha256: str, size: int, keep: Iterable[str]) -> list[Path]:
        """Take out of the cache, least recently offered first, the releases that `keep` (the
        assigned ones) does not name, until `size` more bytes fit; the folders to delete (off
        the event loop). CacheFull if the assigned ones alone leave no room; ReleaseRefused if
        the release is larger than the whole cache."""
        if size > self.limit_bytes:
            raise ReleaseRefused(f"the release's files take {size} bytes, more than the "
                                 f"gateway's OTA cache holds (ota.cache_bytes "
                                 f"{self.limit_bytes})")
        needed = set(keep) | {manifest_sha256}
        used = self.used_bytes() + self._incoming_bytes(exclude=manifest_sha256, keep=needed)
        victims = sorted((r for r in self.releases.values() if r.manifest_sha256 not in needed),
                         key=lambda r: r.offered_at)
        chosen: list[CachedRelease] = []
        while used + size > self.limit_bytes and victims:
            victim = victims.pop(0)
            chosen.append(victim)
            used -= victim.size
        if used + size > self.limit_bytes:
            raise CacheFull(f"{size} bytes do not fit: releases still assigned take "
                            f"{used} of {self.limit_bytes} bytes")
        for victim in chosen:
            log.info("OTA cache: evicted release %s %s (%s, %d bytes, last offered %s)",
                     victim.kind, victim.version, victim.manifest_sha256[:16], victim.size,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(victim.offered_at)))
            self._forget(victim)
        return [v.folder for v in chosen]

    def trim(self, keep: Iterable[str]) -> list[Path]:
        """Take out the least recently offered releases that `keep` does not name while the
        cache holds more than its limit (a limit lowered since they were fetched); the
        folders to delete (off the event loop)."""
        keep = set(keep)
        used = self.used_bytes()
        chosen = []
        for release in sorted(self.releases.values(), key=lambda r: r.offered_at):
            if used <= self.limit_bytes:
                break
            if release.manifest_sha256 not in keep:
                chosen.append(release)
                used -= release.size
        for release in chosen:
            log.info("OTA cache over its limit (ota.cache_bytes %d): evicted release %s %s "
                     "(%s, %d bytes)", self.limit_bytes, release.kind, release.version,
                     release.manifest_sha256[:16], release.size)
            self._forget(release)
        return [r.folder for r in chosen]

    def _forget(self, release: CachedRelease) -> None:
        self.releases.pop(release.manifest_sha256, None)
        if self._by_ref.get(release.ref) is release:
            del self._by_ref[release.ref]
        for key in [k for k in self._handles if k[0] == release.manifest_sha256]:
            os.close(self._handles.pop(key))

    def _incoming_bytes(self, *, exclude: str, keep: set[str]) -> int:
        """Bytes of partial downloads kept for resuming (those of releases in `keep`)."""
        total = 0
        for folder in _folders(self.folder / INCOMING):
            if folder.name != exclude and folder.name in keep:
                total += sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        return total

    def install(self, release: CachedRelease) -> None:
        """A release fetch() completed: in the cache from now on (event loop)."""
        self._add(release)

    # ----- fetching (blocking: a thread of its own) -----

    def fetch_manifest(self, fleet: Fleet, release_id: str, manifest_sha256: str,
                       public_key: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The release's signed manifest from the fleet, checked: (the fleet's answer, the
        manifest's content). ReleaseRefused if it fails a check, FetchError if the fleet
        could not be asked."""
        if public_key is None:
            raise FetchError("no_key", "the fleet's listing has no release_public_key yet")
        doc = fleet.get_json(f"/api/gateway/releases/{release_id}")
        try:
            manifest_bytes = str(doc["manifest"]).encode("utf-8")
            signature = str(doc["signature"])
        except (KeyError, TypeError) as exc:
            raise FetchError("invalid", f"the fleet's answer for release {release_id} is not "
                             f"a signed manifest: {exc!r}") from None
        try:
            manifest = release_manifest.verify(manifest_bytes, signature, public_key)
        except release_manifest.ManifestError as exc:
            raise ReleaseRefused(f"manifest refused: {exc} (key "
                                 f"{release_manifest.fingerprint(public_key)})") from None
        actual = hashlib.sha256(manifest_bytes).hexdigest()
        if actual != manifest_sha256:
            raise ReleaseRefused(f"manifest refused: its SHA-256 is {actual[:16]}..., the "
                                 f"assignment's {manifest_sha256[:16]}...")
        return doc, manifest

    def fetch_files(self, fleet: Fleet, doc: dict[str, Any], manifest: dict[str, Any],
                    manifest_sha256: str, evicted: list[Path]) -> CachedRelease:
        """Delete `evicted`, download the release's files (resuming what incoming/ holds),
        check each, and move the release into the cache folder whole. ReleaseRefused for a
        file whose bytes are not the manifest's; FetchError for a cut download (what came is
        kept and resumed next time)."""
        for folder in evicted:
            shutil.rmtree(folder, ignore_errors=True)
        staging = self.folder / INCOMING / manifest_sha256
        staging.mkdir(parents=True, exist_ok=True)
        release_id = str(doc["id"])
        for index, entry in enumerate(manifest["files"]):
            done = staging / str(index)
            if done.exists() and done.stat().st_size == entry["size"]:
                continue  # downloaded and checked before a cut or a restart
            self._download(fleet, release_id, index, entry, staging)
        doc = {"id": release_id, "kind": doc.get("kind"), "version": doc.get("version"),
               "manifest": doc["manifest"], "signature": doc["signature"]}
        _write_synced(staging / RELEASE_FILE, json.dumps(doc).encode())
        _fsync_folder(staging)
        final = self.folder / RELEASES / manifest_sha256
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a release since deleted
        os.rename(staging, final)
        _fsync_folder(final.parent)
        _fsync_folder(staging.parent)
        return _release_from(final, doc, manifest, time.time())

    def _download(self, fleet: Fleet, release_id: str, index: int, entry: dict[str, Any],
                  staging: Path) -> None:
        size, expected, path = entry["size"], entry["sha256"], entry["path"]
        part = staging / f"{index}.part"
        digest = hashlib.sha256()
        have = 0
        if part.exists():
            with open(part, "rb") as f:  # the bytes already here count in the hash
                while block := f.read(DOWNLOAD_BLOCK):
                    digest.update(block)
                    have += len(block)
        if have > size:
            have, digest = 0, hashlib.sha256()
        with open(part, "r+b" if have else "wb") as out:
            out.truncate(have)
            out.seek(have)
            if have < size:
                headers = {"Range": f"bytes={have}-"} if have else {}
                url = f"/api/gateway/releases/{release_id}/files/{index}"
                if have:
                    log.info("resuming release %s file %d (%s) at byte %d of %d", release_id,
                             index, path, have, size)
                with fleet.open(url, headers) as answer:
                    if have and answer.status != 206:  # the whole file after all
                        out.seek(0)
                        out.truncate(0)
                        have, digest = 0, hashlib.sha256()
                    try:
                        while block := answer.read(DOWNLOAD_BLOCK):
                            have += len(block)
                            if have > size:
                                raise ReleaseRefused(
                                    f"file {index} ({path}) is longer than the manifest's "
                                    f"{size} bytes")
                            digest.update(block)
                            out.write(block)
                    except (OSError, ValueError, http.client.HTTPException) as exc:
                        out.flush()
                        os.fsync(out.fileno())
                        raise FetchError("unreachable", f"download of release {release_id} "
                                         f"file {index} cut at byte {have}: {exc!r}") from None
            out.flush()
            os.fsync(out.fileno())
        if have != size:
            raise FetchError("unreachable", f"download of release {release_id} file {index} "
                             f"ended at byte {have} of {size}")
        if digest.hexdigest() != expected:
            part.unlink()
            raise ReleaseRefused(f"file {index} ({path}): its SHA-256 is "
                                 f"{digest.hexdigest()[:16]}..., the manifest's "
                                 f"{expected[:16]}...: the fleet served other bytes")
        os.rename(part, staging / str(index))

    def drop_incoming(self, keep: Iterable[str], evicted: Iterable[Path] = ()) -> None:
        """Delete partial downloads of releases no longer assigned, and the folders of
        releases trim() took out (blocking)."""
        for folder in evicted:
            shutil.rmtree(folder, ignore_errors=True)
        keep = set(keep)
        for folder in _folders(self.folder / INCOMING):
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def drop_refused(self, manifest_sha256: str) -> None:
        """Delete what was downloaded of a refused release (blocking)."""
        shutil.rmtree(self.folder / INCOMING / manifest_sha256, ignore_errors=True)


def _folders(parent: Path) -> list[Path]:
    try:
        return [p for p in parent.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
