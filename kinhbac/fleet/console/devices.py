"""What the Devices pages show: the device list (search, filters, keyset pages) and one device
(its identity, last status, OTA steps, CONFIG and a chart of its recent readings; the CONFIG
form is device_config.py).

Both are cut to the caller's sites exactly as the API cuts them (kinhbac/fleet/deps.py): the
list through visible_only, a device through visible_or_404, so a device of another site is
"not found" like one that does not exist. The list's filters are the API's (filter_devices)
and its states the overview's (device_state), so a filter means the same everywhere.
"""

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac.fleet import ingest, provisioning
from kinhbac.fleet.console.overview import STATES, device_state
from kinhbac.fleet.deps import Principal, visible_only, visible_or_404
from kinhbac.fleet.errors import NotFound
from kinhbac.fleet.models import (
    Device,
    DeviceStatus,
    DeviceTag,
    RecentReading,
    Release,
    Rollout,
    RolloutEvent,
    Site,
    device_search_text,
    utcnow,
)

PAGE_SIZE = 50  # rows per page: a screen or two on a control-room wall
# Longer than a whole id with dashes (36): longer input is a paste gone wrong, said so.
SEARCH_MAX = 64
TEXT_MAX = 64  # a tag's and a firmware version's longest (their columns)
FEW_MATCHES = 10_000  # a search matching at most this many: its rows sorted, not walked
# The overview's states, then the registry's states a device outside them is in.
LIST_STATES = (*STATES, "registered", "revoked", "rejected")
# "Not seen for more than ...": the silences an operator asks about, by URL value.
SILENCES = {"1h": timedelta(hours=1), "1d": timedelta(days=1), "7d": timedelta(days=7)}
NEVER = "never"
OPTIONS_MAX = 200  # firmware versions and tags offered as suggestions in the filter form
_HEX = re.compile(r"^[0-9a-f]+$")
_CURSOR = re.compile(r"^[0-9a-f]{16}$")  # a wire id: the list's sort key
_SEPARATORS = re.compile(r"[\s:.-]")
# The list's query parameters, in the order its links write them.
PARAMETERS = ("q", "site", "tag", "state", "firmware", "silent", "after")
RECENT_EVENTS = 10  # OTA steps shown on a device's page
# The chart's drawing area, in SVG user units (CSS scales it); the inset keeps the line's
# stroke inside the box at the extremes.
CHART_WIDTH = 320
CHART_HEIGHT = 80
CHART_INSET = 4


@dataclass
class Filters:
    """The list's query parameters as given (so the form shows them back), and the problems
    found in them, as codes the template words."""

    q: str = ""
    site: str = ""  # a site's slug
    tag: str = ""
    state: str = ""
    firmware: str = ""
    silent: str = ""  # a SILENCES key, or NEVER
    after: str = ""  # the last wire id of the page before
    errors: list[str] = field(default_factory=list)

    def url(self, **changes: str) -> str:
        """The list's URL with these filters (and `changes`): a link to share or to page on."""
        values = {name: getattr(self, name) for name in PARAMETERS} | changes
        query = urlencode({name: value for name, value in values.items() if value})
        return "/console/devices" + ("?" + query if query else "")

    @property
    def active(self) -> bool:
        """Whether anything narrows the list (the page it starts at does not)."""
        return any(getattr(self, name) for name in PARAMETERS if name != "after")


def parse_filters(params: Mapping[str, str]) -> Filters:
    """The filters of a query string, each problem named; never raises, so a bad link gets
    the page with a message instead of an error."""
    given = {name: params.get(name, "").strip() for name in PARAMETERS}
    errors = []
    if len(given["q"]) > SEARCH_MAX:
        errors.append("q_too_long")
    if len(given["tag"]) > TEXT_MAX:
        errors.append("tag_too_long")
    if len(given["firmware"]) > TEXT_MAX:
        errors.append("firmware_too_long")
    if given["state"] and given["state"] not in LIST_STATES:
        errors.append("state")
    if given["silent"] and given["silent"] not in (*SILENCES, NEVER):
        errors.append("silent")
    if given["after"] and not _CURSOR.match(given["after"]):
        errors.append("after")
    if len(given["site"]) > TEXT_MAX:
        errors.append("site")  # no slug is this long: an unknown site, whatever it holds
    return Filters(**given, errors=errors)


@dataclass
class DeviceRow:
    id: uuid.UUID
    wire_id: str
    mac: str
    site: str | None  # the site's name; None: at no site
    tags: list[str]
    state: str  # one of LIST_STATES
    firmware_version: str | None
    last_seen_at: datetime | None


@dataclass
class DeviceList:
    rows: list[DeviceRow]
    total: int  # devices the filters match, on every page
    next_after: str | None  # the next page's cursor; None on the last page
    # For the filter form: the caller's sites, and known values to suggest.
    sites: list[Site] = field(default_factory=list)
    firmware_versions: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def search_clause(text: str) -> sa.ColumnElement[bool]:
    """Devices whose id, wire id or MAC contains `text`, written with or without separators
    (":", "-", "." or spaces) and in either case. Only hex digits ever reach the LIKE
    pattern, so "%", "_" and quotes in a search cannot widen it: they match nothing."""
    digits = _SEPARATORS.sub("", text.lower())
    if not digits or not _HEX.match(digits):
        return sa.false()
    # The wire id is "6b62" and the MAC's 12 digits: a MAC typed any way matches it. One
    # expression for both ids: PostgreSQL's trigram index holds exactly it (models.py).
    return device_search_text().like(f"%{digits}%")


def list_devices(session: Session, caller: Principal, filters: Filters) -> DeviceList:
    """One page of the caller's devices the filters match, ordered by wire id (unique, never
    changes): the next page starts after the last row's, so a device added or removed
    meanwhile neither repeats nor hides another one, as an OFFSET would."""
    sites = list(session.exec(visible_only(select(Site), caller, Site).order_by(Site.name)))
    listing = DeviceList(rows=[], total=0, next_after=None, sites=sites,
                         firmware_versions=_firmware_versions(session, caller),
                         tags=_tags(session, caller))
    if filters.errors:
        return listing
    site_id = None
    if filters.site:
        site_id = next((site.id for site in sites if site.slug == filters.site), None)
        if site_id is None:  # unknown, or another's: the same answer
            filters.errors.append("site")
            return listing
    now = utcnow()
    state = device_state(now)

    def narrowed(query: Any) -> Any:
        query = provisioning.filter_devices(
            visible_only(query, caller, Device), site_id=site_id, tag=filters.tag or None,
            firmware_version=filters.firmware or None)
        if filters.q:
            query = query.where(search_clause(filters.q))
        if filters.state:
            query = query.where(state == filters.state)
        if filters.silent == NEVER:
            query = query.where(Device.last_seen_at.is_(None))
        elif filters.silent:
            query = query.where(sa.or_(Device.last_seen_at.is_(None),
                                       Device.last_seen_at < now - SILENCES[filters.silent]))
        return query

    status_join = DeviceStatus.wire_id == Device.wire_id
    if filters.after:
        # Implied by the join, and said for PostgreSQL: a merge join then starts the statuses
        # at the page too, not at the first of them (a third of a second, a million deep).
        status_join = sa.and_(status_join, DeviceStatus.wire_id > filters.after)
    query = narrowed(
        select(Device, state, Site.name)
        .join(DeviceStatus, status_join, isouter=True)
        .join(Site, Site.id == Device.site_id, isouter=True)
    )
    # The count joins the last status only when the state filter asks it: PostgreSQL drops an
    # unused outer join but still reads the table for its key, where the index alone would do
    # (a tenth of a second or more over a million devices; bench/console_bench.py).
    counted = select(sa.func.count()).select_from(Device)
    if filters.state:
        counted = counted.join(DeviceStatus, DeviceStatus.wire_id == Device.wire_id,
                               isouter=True)
    listing.total = session.exec(narrowed(counted)).one()
    if filters.after:
        query = query.where(Device.wire_id > filters.after)
    order = Device.wire_id
    if filters.q and listing.total <= FEW_MATCHES:
        # Sorting the few matches the search index found beats walking the wire id index for
        # the first 51 of them, which PostgreSQL otherwise picks and which reads most of a
        # large fleet when they all sit far along it (a MAC's maker digits, say). Same order.
        order = Device.wire_id + ""
    found = session.exec(query.order_by(order).limit(PAGE_SIZE + 1)).all()
    listing.rows = [
        DeviceRow(id=device.id, wire_id=device.wire_id, mac=device.mac, site=site_name,
                  tags=device.tags, state=shown, firmware_version=device.firmware_version,
                  last_seen_at=device.last_seen_at)
        for device, shown, site_name in found[:PAGE_SIZE]
    ]
    if len(found) > PAGE_SIZE:
        listing.next_after = listing.rows[-1].wire_id
    return listing


def _firmware_versions(session: Session, caller: Principal) -> list[str]:
    if caller.site_ids is None:
        return _distinct_values(session, Device.firmware_version)
    query = visible_only(select(Device.firmware_version).distinct(), caller, Device)
    return list(session.exec(query.where(Device.firmware_version.is_not(None))
                             .order_by(Device.firmware_version).limit(OPTIONS_MAX)))


def _tags(session: Session, caller: Principal) -> list[str]:
    if caller.site_ids is None:  # every tag row has its device: no join to ask which
        return _distinct_values(session, DeviceTag.tag)
    query = select(DeviceTag.tag).distinct().join(Device, Device.id == DeviceTag.device_id)
    return list(session.exec(visible_only(query, caller, Device).order_by(DeviceTag.tag)
                             .limit(OPTIONS_MAX)))


def _distinct_values(session: Session, column: Any) -> list[str]:
    """The first OPTIONS_MAX distinct values of an indexed column, in order, one index probe
    each (the next value above the last): SELECT DISTINCT reads every row, a second or more
    over a city's million devices (bench/console_bench.py). A limited caller's sites hold few
    enough devices for the plain query."""
    found = select(sa.func.min(column).label("value")).cte("found", recursive=True)
    found = found.union_all(
        select(select(sa.func.min(column)).where(column > found.c.value).scalar_subquery())
        .where(found.c.value.is_not(None)))
    return list(session.exec(select(found.c.value).where(found.c.value.is_not(None))
                             .limit(OPTIONS_MAX)))


# ---- one device


@dataclass
class Chart:
    """One sensor's recent readings as an SVG polyline, and as rows for a table."""

    sensor: str
    unit: str
    readings: list[RecentReading]  # oldest first; also those without a value
    points: list[tuple[float, float]]  # one per reading with a value, in SVG units
    low: float | None
    high: float | None

    @property
    def polyline(self) -> str:
        return " ".join(f"{x:g},{y:g}" for x, y in self.points)


@dataclass
class OtaStep:
    at: datetime
    version: str
    from_state: str
    to_state: str
    reason: str | None


@dataclass
class DeviceDetail:
    device: Device
    site: Site | None
    state: str  # one of LIST_STATES
    status: DeviceStatus | None  # its last status from MQTT, if it ever sent one
    charts: list[Chart]
    ota_steps: list[OtaStep]
    readings_kept: int  # how many readings per device the fleet keeps


def device_detail(session: Session, caller: Principal, device_id: str,
                  readings_kept: int) -> DeviceDetail:
    """The device, if the caller may see it; NotFound in the same words for one that does not
    exist, one at another site, and an id that is not one."""
    try:
        wanted = uuid.UUID(device_id)
    except ValueError:
        raise NotFound(f"no device {device_id[:40]!r}") from None
    device = visible_or_404(session, caller, Device, wanted, "device")
    state = session.exec(
        select(device_state(utcnow())).select_from(Device)
        .join(DeviceStatus, DeviceStatus.wire_id == Device.wire_id, isouter=True)
        .where(Device.id == device.id)).one()
    steps = session.exec(
        select(RolloutEvent, Release.version)
        .join(Rollout, Rollout.id == RolloutEvent.rollout_id)
        .join(Release, Release.id == Rollout.release_id)
        .where(RolloutEvent.device_id == device.id)
        .order_by(RolloutEvent.id.desc()).limit(RECENT_EVENTS)).all()
    readings = ingest.recent_readings(session, device.wire_id, readings_kept)
    return DeviceDetail(
        device=device, site=session.get(Site, device.site_id) if device.site_id else None,
        state=state, status=device.status, charts=charts(reversed(readings)),
        ota_steps=[OtaStep(at=event.at, version=version, from_state=event.from_state,
                           to_state=event.to_state, reason=event.reason)
                   for event, version in steps],
        readings_kept=readings_kept)


def charts(readings: Any) -> list[Chart]:
    """A chart per sensor, sensors by name, from readings oldest first. Readings are spaced
    evenly in their order (boot, seq), not by time: a node whose clock never synced has none."""
    by_sensor: dict[str, list[RecentReading]] = {}
    for reading in readings:
        by_sensor.setdefault(reading.sensor, []).append(reading)
    return [_chart(name, rows) for name, rows in sorted(by_sensor.items())]


def _chart(sensor: str, readings: list[RecentReading]) -> Chart:
    values = [r.value for r in readings if r.value is not None]
    low, high = (min(values), max(values)) if values else (None, None)
    span_x = CHART_WIDTH - 2 * CHART_INSET
    span_y = CHART_HEIGHT - 2 * CHART_INSET
    points = []
    for index, reading in enumerate(readings):
        if reading.value is None:
            continue  # NaN or infinity at the node: no point, the line joins its neighbours
        x = CHART_WIDTH / 2 if len(readings) == 1 else CHART_INSET + span_x * index / (
            len(readings) - 1)
        assert low is not None and high is not None
        # A flat series sits mid-height; otherwise the highest value at the top.
        y = CHART_HEIGHT / 2 if high == low else CHART_INSET + span_y * (
            high - reading.value) / (high - low)
        points.append((round(x, 1), round(y, 1)))
    return Chart(sensor=sensor, unit=readings[-1].unit, readings=readings, points=points,
                 low=low, high=high)
