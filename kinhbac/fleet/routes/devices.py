"""The device registry and the first provisioning path: register by MAC."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import AfterValidator

from kinhbac.fleet import provisioning
from kinhbac.fleet.deps import AnyUser, Limit, Offset, SecretBoxDep, SessionDep, Staff
from kinhbac.fleet.identity import normalise_mac
from kinhbac.fleet.models import (
    Device,
    DeviceCreate,
    DeviceProvisioned,
    DevicePublic,
    DeviceState,
    DeviceUpdate,
    Page,
)
from kinhbac.fleet.store import get_or_404

router = APIRouter(prefix="/api/devices", tags=["devices"])


@router.post("", response_model=DeviceProvisioned, status_code=status.HTTP_201_CREATED)
def register_device(
    data: DeviceCreate, session: SessionDep, box: SecretBoxDep, caller: Staff
) -> DeviceProvisioned:
    """Register a device by MAC: the fleet issues its wire id, key id 1 and secret.

    The secret is in this response only; the fleet keeps it encrypted for the gateways.
    """
    return provisioning.register_device(session, box, caller.actor, data)


@router.get("", response_model=Page[DevicePublic])
def list_devices(
    session: SessionDep,
    caller: AnyUser,
    site_id: uuid.UUID | None = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    state: DeviceState | None = None,
    firmware_version: Annotated[str | None, Query(max_length=64)] = None,
    mac: Annotated[str | None, AfterValidator(normalise_mac)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[DevicePublic]:
    """Devices, oldest first, filtered by site, tag, state, firmware version or MAC."""
    return provisioning.list_devices(
        session, site_id=site_id, tag=tag, state=state, firmware_version=firmware_version,
        mac=mac, limit=limit, offset=offset,
    )


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: uuid.UUID, session: SessionDep, caller: AnyUser) -> Device:
    return get_or_404(session, Device, device_id, "device")


@router.patch("/{device_id}", response_model=DevicePublic)
def update_device(
    device_id: uuid.UUID, data: DeviceUpdate, session: SessionDep, caller: Staff
) -> Device:
    """Change where a device is (site), its tags, or its hardware description."""
    return provisioning.update_device(session, caller.actor, device_id, data)


@router.post("/{device_id}/reprovision", response_model=DeviceProvisioned)
def reprovision_device(
    device_id: uuid.UUID, session: SessionDep, box: SecretBoxDep, caller: Staff
) -> DeviceProvisioned:
    """The next key id and a new secret (in this response only); the old key stops working."""
    return provisioning.reprovision(session, box, caller.actor, device_id)


@router.post("/{device_id}/revoke", response_model=DevicePublic)
def revoke_device(device_id: uuid.UUID, session: SessionDep, caller: Staff) -> Device:
    """Withdraw the device's credentials; gateways stop getting its key."""
    return provisioning.revoke(session, caller.actor, device_id)
