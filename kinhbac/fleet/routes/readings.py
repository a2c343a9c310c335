"""Recent readings of a device, from the MQTT ingest's bounded window."""

import uuid

from fastapi import APIRouter

from kinhbac.fleet import ingest
from kinhbac.fleet.deps import AnyUser, Limit, SessionDep, visible_or_404
from kinhbac.fleet.models import Device, ReadingPublic, RecentReading

router = APIRouter(prefix="/api/devices", tags=["devices"])


@router.get("/{device_id}/readings", response_model=list[ReadingPublic])
def recent_readings(
    device_id: uuid.UUID, session: SessionDep, caller: AnyUser, limit: Limit = 50
) -> list[RecentReading]:
    """The device's newest readings, newest first by (boot, seq).

    The fleet keeps the last KINHBAC_INGEST_READINGS_PER_DEVICE (100) per device; the city's
    own systems keep the rest (docs/mqtt.md).
    """
    device = visible_or_404(session, caller, Device, device_id, "device")
    return ingest.recent_readings(session, device.wire_id, limit)
