"""What the Audit log page shows: the fleet's audit entries, newest first, filtered by actor,
action, site and dates, in keyset pages.

It is the API's log (GET /api/audit): admins only, as there (routes/audit.py says why a log
cannot be cut along sites), the same order and the same filters (audit.filter_entries). A site
filter has no column to use, so it means "about that site, or about a gateway or device that
is at it now": a device's history moves with it.
"""

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac.fleet import audit
from kinhbac.fleet.console.paging import parse_time_cursor, time_cursor
from kinhbac.fleet.models import AuditEntry, Device, Gateway, Site

PAGE_SIZE = 50  # as the other lists
ACTOR_MAX = 320  # the actor column's length: an e-mail at its longest
ACTION_MAX = 64  # the action column's length
SITE_MAX = 64  # longer than any slug: an unknown site, whatever it holds
OPTIONS_MAX = 200  # actions offered as suggestions in the filter form
DETAIL_MAX = 200  # characters of one value shown: a CONFIG or a snapshot list can be long
PARAMETERS = ("actor", "action", "site", "from", "to", "after")


@dataclass
class Filters:
    """The page's query parameters as given, and the problems found in them (codes)."""

    actor: str = ""
    action: str = ""
    site: str = ""  # a site's slug
    from_: str = ""  # YYYY-MM-DD, the first day shown (in the console's time zone)
    to: str = ""  # YYYY-MM-DD, the last day shown
    after: str = ""  # the last entry of the page before
    errors: list[str] = field(default_factory=list)

    def url(self, **changes: str) -> str:
        values = {name: getattr(self, _attribute(name)) for name in PARAMETERS} | changes
        query = urlencode({name: value for name, value in values.items() if value})
        return "/console/audit" + ("?" + query if query else "")

    @property
    def active(self) -> bool:
        return any(getattr(self, _attribute(name)) for name in PARAMETERS if name != "after")


def _attribute(parameter: str) -> str:
    return "from_" if parameter == "from" else parameter


def _day(text: str) -> date | None:
    try:
        return date.fromisoformat(text) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) else None
    except ValueError:
        return None


def parse_filters(params: Mapping[str, str]) -> Filters:
    """The filters of a query string, each problem named; never raises."""
    given = {_attribute(name): params.get(name, "").strip() for name in PARAMETERS}
    filters = Filters(**given)
    if len(filters.actor) > ACTOR_MAX:
        filters.errors.append("actor")
    if len(filters.action) > ACTION_MAX:
        filters.errors.append("action")
    if len(filters.site) > SITE_MAX:
        filters.errors.append("site")
    first, last = _day(filters.from_), _day(filters.to)
    if filters.from_ and first is None:
        filters.errors.append("from")
    if filters.to and last is None:
        filters.errors.append("to")
    if first and last and first > last:
        filters.errors.append("range")
    if filters.after and parse_time_cursor(filters.after) is None:
        filters.errors.append("after")
    return filters


@dataclass
class Change:
    name: str
    before: str | None  # None: not in the record before (or no record)
    after: str | None


@dataclass
class EntryRow:
    at: datetime
    actor: str
    actor_kind: str
    action: str
    entity: str
    entity_id: str
    device_id: uuid.UUID | None  # the target, when a device the console has a page for
    site: str | None  # the name of the site the target is at now
    changes: list[Change]


@dataclass
class AuditList:
    rows: list[EntryRow]
    total: int
    next_after: str | None
    sites: list[Site] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)


def list_entries(session: Session, filters: Filters, zone: ZoneInfo) -> AuditList:
    """One page of the log the filters match, newest first (the API's order): the next page
    starts after the last entry shown, so entries written meanwhile shift nothing."""
    sites = list(session.exec(select(Site).order_by(Site.name)))
    actions = list(session.exec(select(AuditEntry.action).distinct()
                                .order_by(AuditEntry.action).limit(OPTIONS_MAX)))
    listing = AuditList(rows=[], total=0, next_after=None, sites=sites, actions=actions)
    if filters.errors:
        return listing
    query = audit.filter_entries(select(AuditEntry), action=filters.action or None)
    if filters.actor:
        query = query.where(AuditEntry.actor == filters.actor)
    if filters.site:
        site = next((s for s in sites if s.slug == filters.site), None)
        if site is None:
            filters.errors.append("site")
            return listing
        query = query.where(_about_site(session, site))
    first, last = _day(filters.from_), _day(filters.to)
    if first is not None:
        query = query.where(AuditEntry.at >= _midnight(first, zone))
    if last is not None:
        query = query.where(AuditEntry.at < _midnight(last + timedelta(days=1), zone))
    listing.total = session.exec(select(sa.func.count()).select_from(query.subquery())).one()
    position = parse_time_cursor(filters.after) if filters.after else None
    if position is not None:
        at, last_id = position
        query = query.where(sa.or_(AuditEntry.at < at,
                                   sa.and_(AuditEntry.at == at, AuditEntry.id > last_id)))
    found = session.exec(query.order_by(*audit.ORDER).limit(PAGE_SIZE + 1)).all()
    entries = found[:PAGE_SIZE]
    places = _places(session, entries)
    listing.rows = [EntryRow(
        at=e.at, actor=e.actor, actor_kind=e.actor_kind, action=e.action, entity=e.entity,
        entity_id=e.entity_id,
        device_id=uuid.UUID(e.entity_id) if e.entity == "device" and _uuid(e.entity_id) else None,
        site=places.get((e.entity, e.entity_id)), changes=changes(e.before, e.after))
        for e in entries]
    if len(found) > PAGE_SIZE:
        listing.next_after = time_cursor(entries[-1].at, entries[-1].id)
    return listing


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    """The start of `day` where the console's users are, in UTC as the log stores times."""
    return datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _about_site(session: Session, site: Site) -> sa.ColumnElement[bool]:
    """Entries about `site`, its gateways or the devices at it now. Subqueries, not lists of
    ids: a site of a hundred thousand devices would pass the databases' limits on query
    parameters (SQLite's 32,766, PostgreSQL's 65,535)."""
    dialect = session.get_bind().dialect.name
    return sa.or_(
        sa.and_(AuditEntry.entity == "site", AuditEntry.entity_id == str(site.id)),
        sa.and_(AuditEntry.entity == "gateway", AuditEntry.entity_id.in_(
            select(_as_logged(Gateway.id, dialect)).where(Gateway.site_id == site.id))),
        sa.and_(AuditEntry.entity == "device", AuditEntry.entity_id.in_(
            select(_as_logged(Device.id, dialect)).where(Device.site_id == site.id))),
    )


def _as_logged(column: Any, dialect: str) -> sa.ColumnElement[str]:
    """A UUID column as the log writes ids (str(uuid): hex in 8-4-4-4-12 groups). PostgreSQL
    casts its uuid type to that text; SQLite keeps the 32 hex digits without dashes."""
    if dialect != "sqlite":
        return sa.cast(column, sa.String)
    parts = [sa.func.substr(column, start, length)
             for start, length in ((1, 8), (9, 4), (13, 4), (17, 4), (21, 12))]
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.op("||")("-").op("||")(part)
    return sa.func.lower(joined)


def _places(session: Session, entries: list[AuditEntry]) -> dict[tuple[str, str], str]:
    """The name of the site each entry's site, gateway or device is at now."""
    wanted: dict[str, set[uuid.UUID]] = {"site": set(), "gateway": set(), "device": set()}
    for entry in entries:
        ident = _uuid(entry.entity_id)
        if entry.entity in wanted and ident is not None:
            wanted[entry.entity].add(ident)
    places: dict[tuple[str, str], str] = {}
    if wanted["site"]:
        for site in session.exec(select(Site).where(Site.id.in_(wanted["site"]))):
            places[("site", str(site.id))] = site.name
    for model, kind in ((Gateway, "gateway"), (Device, "device")):
        if wanted[kind]:
            for ident, name in session.exec(
                    select(model.id, Site.name).join(Site, Site.id == model.site_id)
                    .where(model.id.in_(wanted[kind]))):
                places[(kind, str(ident))] = name
    return places


def changes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[Change]:
    """What an entry records: the fields that differ between before and after, each value as
    compact JSON (cut to DETAIL_MAX characters); every field of a record only one side has."""
    before, after = before or {}, after or {}
    found = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if name in before and name in after and old == new:
            continue
        found.append(Change(name=name, before=_shown(old) if name in before else None,
                            after=_shown(new) if name in after else None))
    return found


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           sort_keys=True)
    return text if len(text) <= DETAIL_MAX else text[:DETAIL_MAX] + "…"
