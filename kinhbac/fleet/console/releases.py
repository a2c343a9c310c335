"""What the Releases pages show: the releases, newest first, and one release with its signed
manifest, its files and which of the caller's boards it fits.

Releases are the API's (kinhbac/fleet/releases.py): the upload is releases.create_release, the
fit of an image is releases.image_fit_problem and the fit of a bundle rollouts.short_of_flash,
the very checks the upload and a rollout make; nothing here decides a fit a second way.
"""

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac import release_manifest
from kinhbac.fleet import releases, rollouts
from kinhbac.fleet.console.paging import parse_time_cursor, time_cursor
from kinhbac.fleet.deps import Principal, visible_only
from kinhbac.fleet.errors import Invalid, NotFound
from kinhbac.fleet.models import Device, DeviceState, Release, ReleaseKind, Rollout
from kinhbac.fleet.uploads import ReceivedFile

PAGE_SIZE = 50  # as the other lists
NAMED_SHORT = 5  # devices named on the page for want of flash; the rest are counted
BOARD_FOLDER_MAX = 255  # a board path's length (release_manifest's limit)
# The script sends a chosen folder's files by their paths inside it, and says so in this field;
# a plain form post has no such field.
PATHS_FIELD = "paths"
RELATIVE_PATHS = "relative"

# The API's reasons that are fixed sentences, by a code the form page says in the user's
# language; any other reason names values and is shown as the fleet gave it.
FIXED_REASONS = {
    "the image is empty": "empty_image",
    "no files: send the image, or the bundle's files each with its board path as its file "
    "name": "no_files",
    "give the release's kind: bundle or image": "no_kind",
    "give the release's version, e.g. 0.2.0": "no_version",
}


class FolderPathRefused(Invalid):
    """A file of the chosen folder that no board could take, named as it was sent, with the
    board-path rule it breaks in that rule's own words (None: an absolute path, which no path
    inside a folder is)."""

    def __init__(self, path: str, problem: str | None) -> None:
        super().__init__(releases.FILE_FIELD, f"{path!r} in the chosen folder: "
                         f"{problem or 'an absolute path, not one inside the folder'}")
        self.path = path
        self.problem = problem


@dataclass
class ReleaseRow:
    id: uuid.UUID
    kind: ReleaseKind
    version: str
    size: int
    created_at: datetime
    uploaded_by: str
    rollouts: int  # rollouts of it, whatever their state


@dataclass
class ReleaseList:
    rows: list[ReleaseRow]
    total: int
    next_after: str | None
    after: str = ""
    error: str | None = None  # "after": a damaged page link


def list_releases(session: Session, params: Mapping[str, str]) -> ReleaseList:
    """One page of releases, newest first (then by id), in keyset pages as the device list's:
    a release uploaded meanwhile neither repeats nor hides another."""
    after = params.get("after", "").strip()
    listing = ReleaseList(rows=[], total=0, next_after=None, after=after)
    query = select(Release)
    if after:
        position = parse_time_cursor(after)
        if position is None:
            listing.error = "after"
            return listing
        at, last_id = position
        query = query.where(sa.or_(Release.created_at < at,
                                   sa.and_(Release.created_at == at, Release.id < last_id)))
    listing.total = session.exec(select(sa.func.count()).select_from(Release)).one()
    found = session.exec(query.order_by(Release.created_at.desc(), Release.id.desc())
                         .limit(PAGE_SIZE + 1)).all()
    page = found[:PAGE_SIZE]
    used = dict(session.exec(
        select(Rollout.release_id, sa.func.count()).where(
            Rollout.release_id.in_([r.id for r in page]))  # type: ignore[attr-defined]
        .group_by(Rollout.release_id)).all()) if page else {}
    listing.rows = [ReleaseRow(id=r.id, kind=r.kind, version=r.version, size=r.size,
                               created_at=r.created_at, uploaded_by=r.uploaded_by,
                               rollouts=used.get(r.id, 0)) for r in page]
    if len(found) > PAGE_SIZE:
        listing.next_after = time_cursor(page[-1].created_at, page[-1].id)
    return listing


@dataclass
class LayoutFit:
    """An image against one flash layout of the caller's boards."""

    name: str
    slot_bytes: int
    devices: int  # the caller's active devices on it
    fits: bool
    reason: str | None  # the upload's own words when it does not fit


@dataclass
class BundleFit:
    needed: int  # the manifest's min_free_bytes
    devices: int  # the caller's active devices
    reported: int  # of them, those that reported their free flash
    short: int  # of them, those with less than `needed`
    named: list[tuple[str, int]] = field(default_factory=list)  # first few: wire id, free


@dataclass
class ReleaseView:
    release: Release
    manifest: str  # pretty-printed for reading; the signed bytes are release.manifest
    signature: str  # base64
    fingerprint: str
    rollouts: int
    image: list[LayoutFit] = field(default_factory=list)
    bundle: BundleFit | None = None


def release_view(session: Session, caller: Principal, release_id: str) -> ReleaseView:
    """One release and its fit to the caller's active devices; NotFound for an id that is no
    release's (or no id)."""
    try:
        wanted = uuid.UUID(release_id)
    except ValueError:
        raise NotFound("no such release") from None
    release = session.get(Release, wanted)
    if release is None:
        raise NotFound("no such release")
    devices = list(session.exec(visible_only(
        select(Device).where(Device.state == DeviceState.active), caller, Device)).all())
    view = ReleaseView(
        release=release,
        manifest=json.dumps(json.loads(release.manifest), indent=2, ensure_ascii=False),
        signature=release_manifest.b64(release.signature),
        fingerprint=release_manifest.fingerprint(release.signing_key),
        rollouts=session.exec(select(sa.func.count()).select_from(Rollout).where(
            Rollout.release_id == release.id)).one())
    if release.kind == ReleaseKind.image:
        # Boards record no partition table of their own yet: every one runs the layout
        # releases are sized against (releases.LAYOUT_NAME), so that is the one to show.
        problem = releases.image_fit_problem(release.size)
        view.image = [LayoutFit(name=releases.LAYOUT_NAME, slot_bytes=releases.SLOT_BYTES,
                                devices=len(devices), fits=problem is None, reason=problem)]
    else:
        needed, short = rollouts.short_of_flash(release, devices, set())
        view.bundle = BundleFit(
            needed=needed, devices=len(devices),
            reported=sum(1 for d in devices if d.free_flash_bytes is not None),
            short=len(short),
            named=[(d.wire_id, d.free_flash_bytes or 0) for d in short[:NAMED_SHORT]])
    return view


def board_paths(upload_files: list[ReceivedFile], fields: Mapping[str, str]) -> None:
    """Name a bundle's files by board path, as the form sent them. Without `paths`, a browser
    sends a file's base name only, so the form's board folder goes before it (a name already
    absolute, as curl can send, stays). With paths=relative (the script, for a chosen folder),
    each name is the file's path inside that folder, which is the board's root: see
    folder_paths."""
    given = fields.get(PATHS_FIELD, "")
    if given == RELATIVE_PATHS:
        folder_paths(upload_files)
        return
    if given:
        raise Invalid(PATHS_FIELD, f"{PATHS_FIELD} is {RELATIVE_PATHS!r} or not given, not "
                      f"{given!r}")
    folder = fields.get("folder", "")
    folder = "/" + folder.strip().strip("/") if folder.strip().strip("/") else ""
    for received in upload_files:
        if not received.name.startswith("/"):
            received.name = f"{folder}/{received.name}"


def folder_paths(upload_files: list[ReceivedFile]) -> None:
    """Put each file at /<its path inside the chosen folder>. The names are the sender's to
    choose, so each is refused by name (FolderPathRefused) unless it is a path inside the folder
    that the manifest's own rule (release_manifest.board_path_problem, which create_release
    applies again) accepts under /: no absolute path, no '..', backslash or empty part."""
    for received in upload_files:
        sent = received.name
        if sent.startswith("/"):
            raise FolderPathRefused(sent, None)
        problem = release_manifest.board_path_problem("/" + sent)
        if problem:
            raise FolderPathRefused(sent, problem)
    for received in upload_files:
        received.name = "/" + received.name
