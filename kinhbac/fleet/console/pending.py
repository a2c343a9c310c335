"""What the Pending page shows: the devices waiting for an admin's approval at the caller's
sites, newest claim first, with their claims as the fleet records them.

The fleet keeps a pending device's first claim on the device (its nonce, pinned) and writes an
audit entry for each claim that changed the registry (`device.claim`) or was refused because it
contradicted the pinned one (`device.claim_conflict`, with the nonce it carried). A claim that
repeats the pinned one changes nothing and is not stored, so "last claim" is the last recorded
one. The approval and the rejection themselves are provisioning.approve_claim and
reject_claim, the functions the API's routes call (pages.py).
"""

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac.fleet.console.paging import parse_time_cursor, time_cursor
from kinhbac.fleet.deps import Principal, visible_only
from kinhbac.fleet.models import AuditEntry, Device, DeviceState, Gateway, Site

PAGE_SIZE = 50  # as the device list: a screen or two on a control-room wall
CLAIM_ACTIONS = ("device.claim", "device.claim_conflict")
# A page link's cursor: the last row's created_at (microseconds since the epoch) and its id.
# What an action's redirect may say (?done=...): codes, never text from the URL.
DONE = ("approved", "rejected")


@dataclass
class Claim:
    """One recorded claim of a device."""

    at: datetime
    nonce: str | None  # None: a claim entry that does not carry it (the pinned one's)
    gateway: str  # the gateway that reported it, by name
    refused: bool  # a claim_conflict: another nonce, site or claim key than the pinned one


@dataclass
class PendingRow:
    id: uuid.UUID
    wire_id: str
    mac: str
    site: str | None  # the site's name
    nonce: str | None  # the pinned claim's nonce: the one an approval answers
    first_claimed_at: datetime
    last_claimed_at: datetime
    gateway: str | None  # the gateway that reported its first claim
    claims: list[Claim] = field(default_factory=list)  # newest first


@dataclass
class PendingList:
    rows: list[PendingRow]
    total: int
    next_after: str | None  # the next page's cursor; None on the last page
    after: str = ""  # this page's cursor, as given
    error: str | None = None  # "after": a damaged page link


def count(session: Session, caller: Principal) -> int:
    """The caller's pending devices: the navigation's number."""
    query = select(sa.func.count()).select_from(Device).where(
        Device.state == DeviceState.pending)
    return session.exec(visible_only(query, caller, Device)).one()


def list_pending(session: Session, caller: Principal, params: Mapping[str, str]) -> PendingList:
    """One page of the caller's pending devices, newest first (by when the registry took them,
    then id): keyset pages as the device list's, so a claim arriving meanwhile does not
    shift a device onto the next page twice."""
    after = params.get("after", "").strip()
    listing = PendingList(rows=[], total=0, next_after=None, after=after)
    position = None
    if after:
        position = parse_time_cursor(after)
        if position is None:
            listing.error = "after"
            return listing
    query = visible_only(
        select(Device, Site.name).join(Site, Site.id == Device.site_id, isouter=True)
        .where(Device.state == DeviceState.pending), caller, Device)
    listing.total = session.exec(select(sa.func.count()).select_from(query.subquery())).one()
    if position is not None:
        at, last_id = position
        query = query.where(sa.or_(Device.created_at < at,
                                   sa.and_(Device.created_at == at, Device.id < last_id)))
    found = session.exec(query.order_by(Device.created_at.desc(), Device.id.desc())
                         .limit(PAGE_SIZE + 1)).all()
    page = found[:PAGE_SIZE]
    claims = _claims(session, [device.id for device, _ in page])
    for device, site_name in page:
        recorded = claims.get(device.id, [])
        first = [c for c in recorded if not c.refused]
        listing.rows.append(PendingRow(
            id=device.id, wire_id=device.wire_id, mac=device.mac, site=site_name,
            nonce=device.claim_nonce,
            first_claimed_at=first[-1].at if first else device.created_at,
            last_claimed_at=recorded[0].at if recorded else device.created_at,
            gateway=first[-1].gateway if first else None, claims=recorded))
    if len(found) > PAGE_SIZE:
        last = page[-1][0]
        listing.next_after = time_cursor(last.created_at, last.id)
    return listing


def _claims(session: Session, device_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Claim]]:
    """The recorded claims of these devices, newest first, each with its gateway's name."""
    if not device_ids:
        return {}
    entries = session.exec(
        select(AuditEntry).where(AuditEntry.entity == "device",
                                 AuditEntry.action.in_(CLAIM_ACTIONS),
                                 AuditEntry.entity_id.in_([str(i) for i in device_ids]))
        .order_by(AuditEntry.at.desc(), AuditEntry.id)).all()
    gateway_ids = {e.actor_id for e in entries if e.actor_kind == "gateway" and e.actor_id}
    names = {g.id: g.name for g in session.exec(
        select(Gateway).where(Gateway.id.in_(gateway_ids)))} if gateway_ids else {}
    claims: dict[uuid.UUID, list[Claim]] = {}
    for entry in entries:
        refused = entry.action == "device.claim_conflict"
        after = entry.after or {}
        gateway = names.get(entry.actor_id) if entry.actor_id else None
        claims.setdefault(uuid.UUID(entry.entity_id), []).append(Claim(
            at=entry.at, nonce=after.get("nonce") if refused else None,
            gateway=gateway or str(after.get("gateway") or entry.actor), refused=refused))
    return claims
