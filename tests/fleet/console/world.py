"""A small city for the overview: two sites with devices in every state the overview counts."""

from dataclasses import dataclass
from datetime import timedelta

from fastapi import FastAPI
from sqlmodel import Session, select

from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.models import (
    Device,
    DeviceStatus,
    GatewayStatus,
    Rollout,
    RolloutDevice,
    RolloutDeviceState,
    RolloutTargetKind,
    Site,
    utcnow,
)

from ..utils import make_device, make_gateway, make_pending_device, make_release, make_site


@dataclass
class City:
    home: Site  # two online, one offline, one pending, one updating; its gateway connected
    away: Site  # one online; its gateway connected, with 12,345 readings dropped


def heard(session: Session, wire_id: str, site: Site, *, ago_s: float = 5) -> None:
    """A gateway's status for the device, kept as the ingest keeps it: on the status row and
    as the registry's last-seen time (a device page shows both)."""
    now = utcnow()
    seen = now - timedelta(seconds=ago_s)
    session.add(DeviceStatus(wire_id=wire_id, site=site.slug, gateway="gw", received_at=now,
                             last_seen_at=seen, offline_at=now + timedelta(seconds=180 - ago_s)))
    device = session.exec(select(Device).where(Device.wire_id == wire_id)).one()
    if device.last_seen_at is None or device.last_seen_at <= seen:
        device.last_seen_at = seen
        session.add(device)


def gateway_reported(session: Session, site: Site, name: str, state: str,
                     dropped: dict[str, int] | None = None, *, queue_depth: int | None = None,
                     oldest_queued_ago: timedelta | None = None) -> None:
    """The gateway's last status, as the ingest keeps it (replacing the one before); without
    queue figures, as a gateway before them sends it."""
    now = utcnow()
    session.merge(GatewayStatus(
        site=site.slug, gateway=name, state=state, received_at=now,
        since_at=now - timedelta(hours=2), dropped=dropped or {}, queue_depth=queue_depth,
        oldest_queued_at=None if oldest_queued_ago is None else now - oldest_queued_ago))


def make_city(session: Session, box: SecretBox, app: FastAPI) -> City:
    home = make_site(session, box, slug="ward7", name="Ward 7 water tower")
    away = make_site(session, box, slug="badinh", name="Ba Dinh pumping station")
    home_gateway, _ = make_gateway(session, home, "gw-ward7")
    make_gateway(session, away, "gw-badinh")
    for _ in range(2):
        heard(session, make_device(session, box, home).wire_id, home)
    make_device(session, box, home)  # never heard: offline
    make_pending_device(session, home_gateway)
    updating = make_device(session, box, home)
    heard(session, updating.wire_id, home)  # online too, but counted as updating
    heard(session, make_device(session, box, away).wire_id, away)
    gateway_reported(session, home, "gw-ward7", "online")
    gateway_reported(session, away, "gw-badinh", "online", {"disk_cap": 12_000, "ttl": 345})
    release = make_release(session, app)
    rollout = Rollout(release_id=release.id, target_kind=RolloutTargetKind.site,
                      target_value=home.slug, waves=[100], wave_started_at=[None],
                      success_threshold=95, failure_threshold=5, device_deadline_s=86400,
                      created_by="cli")
    session.add(rollout)
    session.flush()
    session.add(RolloutDevice(rollout_id=rollout.id, device_id=updating.id, position=0, wave=0,
                              state=RolloutDeviceState.downloading))
    session.commit()
    return City(home=home, away=away)
