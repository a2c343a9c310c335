"""What the overview shows: each site's devices by state and its gateways' uplinks, cut to the
caller's sites exactly as the API cuts its lists (kinhbac/fleet/deps.py, visible_only).

A device counts in one state only, the first that holds:
- pending: it introduced itself with its site's claim key and waits for an admin;
- updating: an active device in a running or paused rollout, offered and not yet finished;
- online: an active device whose gateway heard it within KINHBAC_INGEST_OFFLINE_AFTER_S;
- offline: every other active device, also one never heard.
Devices registered without credentials, revoked or rejected are in none of them.

The counts of a city-wide page are a few seconds old: they are taken for every site at once and
kept for KINHBAC_CONSOLE_COUNTS_MAX_AGE_S (site_counts.py), and the page says when they were
taken. A site's own page counts its devices on each visit.

A gateway's queue (how many readings wait for the broker, and since when) is as its last status
said (every 30 s while it is connected); the age of its oldest reading counts on from there, so
a gateway cut off with a backlog is seen ageing.
"""

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac.fleet.console.site_counts import SiteCounts
from kinhbac.fleet.deps import Principal, visible_only
from kinhbac.fleet.models import (
    Device,
    DeviceState,
    DeviceStatus,
    Gateway,
    GatewayStatus,
    Rollout,
    RolloutDevice,
    RolloutDeviceState,
    RolloutState,
    Site,
    utcnow,
)

STATES = ("online", "offline", "pending", "updating")
# A device between an offer and a final state: what "updating" means on the overview.
UPDATING = (RolloutDeviceState.offered, RolloutDeviceState.downloading,
            RolloutDeviceState.verifying, RolloutDeviceState.installed,
            RolloutDeviceState.rebooting)
LIVE_ROLLOUTS = (RolloutState.running, RolloutState.paused)
# A reading queued longer than this on a gateway puts its site among those needing attention:
# a connected gateway drains a backlog within seconds (docs/mqtt.md), so ten minutes means the
# uplink has been down that long, or cannot keep up.
QUEUE_ATTENTION_AGE = timedelta(minutes=10)


@dataclass
class GatewayRow:
    name: str
    uplink: str  # online, offline, or unknown (never reported)
    last_status_at: datetime | None  # when the fleet last took its status message
    online_since: datetime | None  # when its current (or last) broker session began
    dropped: int  # policy drops it reported, all reasons together
    # None: the gateway never reported them (a gateway before the figures), not reported.
    queue_depth: int | None = None
    # How long its oldest queued reading has waited; None with a depth of 0 (nothing waits).
    oldest_queued_age: timedelta | None = None

    @property
    def queue_stale(self) -> bool:
        """A reading has waited in its queue past QUEUE_ATTENTION_AGE."""
        return self.oldest_queued_age is not None and \
            self.oldest_queued_age >= QUEUE_ATTENTION_AGE


@dataclass
class SiteRow:
    id: uuid.UUID
    name: str
    slug: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    counted_at: datetime | None = None  # when `counts` were taken (None: not counted)
    gateways: list[GatewayRow] = field(default_factory=list)

    @property
    def attention(self) -> list[str]:
        """Why the site needs someone's attention, most urgent first; [] when it does not."""
        reasons = []
        if not self.gateways or any(g.uplink != "online" for g in self.gateways):
            reasons.append("gateway")
        if any(g.queue_stale for g in self.gateways):
            reasons.append("queue")
        if self.counts["offline"]:
            reasons.append("offline")
        if self.counts["pending"]:
            reasons.append("pending")
        return reasons


def device_state(now: datetime) -> sa.Case[str]:
    """The state a device is shown in, as one SQL expression: the overview's four (module
    docstring) for pending and active devices, else the registry's own (registered, revoked,
    rejected). The query must outer-join DeviceStatus by wire id. The device list asks this
    too (devices.py), so a device is "offline" on both pages alike."""
    updating = sa.exists().where(
        RolloutDevice.device_id == Device.id,
        RolloutDevice.state.in_(UPDATING),
        Rollout.id == RolloutDevice.rollout_id,
        Rollout.state.in_(LIVE_ROLLOUTS),
    )
    return sa.case(
        (Device.state.not_in((DeviceState.pending, DeviceState.active)),
         sa.cast(Device.state, sa.String)),
        (Device.state == DeviceState.pending, sa.literal("pending")),
        (updating, sa.literal("updating")),
        (DeviceStatus.offline_at > now, sa.literal("online")),
        else_=sa.literal("offline"),
    )


def _device_states(now: datetime) -> sa.Select:
    return (
        select(Device.site_id.label("site_id"), device_state(now).label("state"))
        .select_from(Device)
        .join(DeviceStatus, DeviceStatus.wire_id == Device.wire_id, isouter=True)
        .where(Device.state.in_((DeviceState.pending, DeviceState.active)),
               Device.site_id.is_not(None))
    )


def count_by_site(session: Session, now: datetime, caller: Principal | None = None, *,
                  site_id: uuid.UUID | None = None) -> dict[uuid.UUID, dict[str, int]]:
    """Devices by state at each site (the caller's, or every site without one; only `site_id`
    with it), as of `now`; a site without devices is absent."""
    device_query = _device_states(now)
    if caller is not None:
        device_query = visible_only(device_query, caller, Device)
    if site_id is not None:
        device_query = device_query.where(Device.site_id == site_id)
    inner = device_query.subquery()
    counted: dict[uuid.UUID, dict[str, int]] = {}
    for counted_site, state, count in session.exec(
            select(inner.c.site_id, inner.c.state, sa.func.count())
            .group_by(inner.c.site_id, inner.c.state)).all():
        counted.setdefault(counted_site, dict.fromkeys(STATES, 0))[state] = count
    return counted


def kept_counts(max_age_s: float) -> SiteCounts:
    """Every site's counts, kept `max_age_s` for the city-wide pages (app.state.site_counts)."""
    return SiteCounts(count_by_site, max_age_s=max_age_s)


def sites(session: Session, caller: Principal, *, site_id: uuid.UUID | None = None,
          kept: SiteCounts | None = None) -> list[SiteRow]:
    """The caller's sites with their counts and gateways, those needing attention first; with
    `site_id`, only that site (if the caller sees it): the Sites pages read theirs here. With
    `kept`, the counts are its rows of the caller's sites (a few seconds old, every site's
    taken at once); without, the caller's sites are counted now."""
    now = utcnow()
    site_query = visible_only(select(Site), caller, Site)
    gateway_query = visible_only(
        select(Gateway, Site.slug).join(Site, Site.id == Gateway.site_id), caller, Gateway)
    if site_id is not None:
        site_query = site_query.where(Site.id == site_id)
        gateway_query = gateway_query.where(Gateway.site_id == site_id)
    rows = {site.id: SiteRow(id=site.id, name=site.name, slug=site.slug)
            for site in session.exec(site_query).all()}
    if not rows:
        return []
    if kept is not None:
        taken = kept.get(session)
        counted_at, counted = taken.taken_at, taken.by_site
    else:
        counted_at, counted = now, count_by_site(session, now, caller, site_id=site_id)
    # Only the caller's own sites' rows are read (rows holds those alone), and copied: the kept
    # counts are every site's and every visitor's.
    for row in rows.values():
        row.counted_at = counted_at
        if row.id in counted:
            row.counts = dict(counted[row.id])
    by_slug = {row.slug: row for row in rows.values()}
    statuses = {(s.site, s.gateway): s for s in session.exec(
        select(GatewayStatus).where(GatewayStatus.site.in_(list(by_slug)))).all()}
    gateways = session.exec(gateway_query.order_by(Gateway.name)).all()
    for gateway, slug in gateways:
        status = statuses.get((slug, gateway.name))
        rows[gateway.site_id].gateways.append(GatewayRow(
            name=gateway.name,
            uplink=status.state if status else "unknown",
            last_status_at=status.received_at if status else None,
            online_since=status.since_at if status else None,
            dropped=sum((status.dropped or {}).values()) if status else 0,
            queue_depth=status.queue_depth if status else None,
            # A gateway's clock ahead of ours must not show a negative age.
            oldest_queued_age=None if status is None or status.oldest_queued_at is None
            else max(timedelta(0), now - status.oldest_queued_at),
        ))
    # A site whose gateway is down leads: nothing of it reaches the city while it is; then one
    # whose readings are held up on a gateway.
    return sorted(rows.values(), key=lambda r: (
        not r.attention, "gateway" not in r.attention, "queue" not in r.attention,
        -r.counts["offline"], -r.counts["pending"], r.name.casefold()))
