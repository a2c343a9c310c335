"""Device identities: registration by MAC, re-provisioning, revocation, and the key listing a
gateway fetches for its site.

A device's secret is returned once, to whoever registered it, and then stored only sealed
with the service key; it is opened again only for a gateway enrolled at the device's site.
"""

import os
import uuid

import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac.fleet import audit
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.errors import Conflict, Invalid
from kinhbac.fleet.identity import wire_id_for
from kinhbac.fleet.models import (
    MAX_KEY_ID,
    Device,
    DeviceCreate,
    DeviceProvisioned,
    DevicePublic,
    DeviceState,
    DeviceTag,
    DeviceUpdate,
    Gateway,
    GatewayKey,
    GatewayKeys,
    Page,
    Site,
    utcnow,
)
from kinhbac.fleet.store import commit, get_or_404, page

SECRET_BYTES = 32  # HMAC-SHA256 key: the hash's block-size half, as the emulator issues


def _secret_context(device_id: uuid.UUID, key_id: int) -> bytes:
    # Bound to the key id too: a sealed key 1 cannot be passed off as key 2.
    return b"device secret " + device_id.bytes + key_id.to_bytes(2, "big")


def _check_site(session: Session, site_id: uuid.UUID | None) -> None:
    if site_id is not None and session.get(Site, site_id) is None:
        raise Invalid("site_id", f"no site {site_id}")


def _provisioned(device: Device, secret: bytes) -> DeviceProvisioned:
    return DeviceProvisioned.model_validate(device, update={"secret": secret.hex()})


def register_device(
    session: Session, box: SecretBox, actor: Actor, data: DeviceCreate
) -> DeviceProvisioned:
    """A new device with wire id "kb"+MAC, key id 1 and a fresh secret (returned this once)."""
    existing = session.exec(select(Device).where(Device.mac == data.mac)).first()
    if existing is not None:
        raise Conflict(f"a device with MAC {data.mac} is already registered (id {existing.id})")
    _check_site(session, data.site_id)
    secret = os.urandom(SECRET_BYTES)
    device_id = uuid.uuid4()
    device = Device.model_validate(data.model_dump(exclude={"tags"}), update={
        "id": device_id,
        "wire_id": wire_id_for(data.mac),
        "key_id": 1,
        "secret_enc": box.seal(secret, context=_secret_context(device_id, 1)),
        "state": DeviceState.active,
    })
    device.set_tags(data.tags)
    session.add(device)
    audit.record(session, actor, "device.create", "device", device.id,
                 after=audit.snapshot(device, DevicePublic))
    commit(session, f"a device with MAC {data.mac} is already registered")
    session.refresh(device)
    return _provisioned(device, secret)


def update_device(
    session: Session, actor: Actor, device_id: uuid.UUID, data: DeviceUpdate
) -> Device:
    device = get_or_404(session, Device, device_id, "device")
    before = audit.snapshot(device, DevicePublic)
    changes = data.model_dump(exclude_unset=True)
    if "site_id" in changes:
        _check_site(session, changes["site_id"])
    if "tags" in changes:
        device.set_tags(changes.pop("tags") or [])
    for name, value in changes.items():
        setattr(device, name, value)
    device.updated_at = utcnow()
    audit.record(session, actor, "device.update", "device", device.id,
                 before=before, after=audit.snapshot(device, DevicePublic))
    session.add(device)
    commit(session, "the device changed meanwhile; try again")
    session.refresh(device)
    return device


def reprovision(
    session: Session, box: SecretBox, actor: Actor, device_id: uuid.UUID
) -> DeviceProvisioned:
    """The next key id and a fresh secret (returned this once); the old key stops working."""
    device = get_or_404(session, Device, device_id, "device")
    if device.key_id >= MAX_KEY_ID:
        raise Conflict(f"device {device.mac} has used every key id up to {MAX_KEY_ID}")
    before = audit.snapshot(device, DevicePublic)
    old_key_id = device.key_id
    key_id = old_key_id + 1
    secret = os.urandom(SECRET_BYTES)
    # Compare-and-set on the key id: of two re-provisionings at once, one is refused rather
    # than both returning a secret and only one being stored.
    changed = session.execute(
        sa.update(Device)
        .where(Device.id == device.id, Device.key_id == old_key_id)
        .values(
            key_id=key_id,
            secret_enc=box.seal(secret, context=_secret_context(device.id, key_id)),
            state=DeviceState.active,
            updated_at=utcnow(),
        )
    )
    if changed.rowcount != 1:
        session.rollback()
        raise Conflict(f"device {device.mac} was re-provisioned meanwhile; try again")
    session.refresh(device)
    audit.record(session, actor, "device.reprovision", "device", device.id,
                 before=before, after=audit.snapshot(device, DevicePublic))
    commit(session, "the device changed meanwhile; try again")
    session.refresh(device)
    return _provisioned(device, secret)


def revoke(session: Session, actor: Actor, device_id: uuid.UUID) -> Device:
    """Withdraw the device's credentials: its secret is erased and no gateway gets its key."""
    device = get_or_404(session, Device, device_id, "device")
    if device.state == DeviceState.revoked:
        raise Conflict(f"device {device.mac} is already revoked")
    before = audit.snapshot(device, DevicePublic)
    device.state = DeviceState.revoked
    device.secret_enc = None
    device.updated_at = utcnow()
    audit.record(session, actor, "device.revoke", "device", device.id,
                 before=before, after=audit.snapshot(device, DevicePublic))
    session.add(device)
    commit(session, "the device changed meanwhile; try again")
    session.refresh(device)
    return device


def list_devices(
    session: Session,
    *,
    site_id: uuid.UUID | None = None,
    tag: str | None = None,
    state: DeviceState | None = None,
    firmware_version: str | None = None,
    mac: str | None = None,
    limit: int,
    offset: int,
) -> Page[DevicePublic]:
    query = select(Device)
    if site_id is not None:
        query = query.where(Device.site_id == site_id)
    if tag is not None:
        query = query.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    if state is not None:
        query = query.where(Device.state == state)
    if firmware_version is not None:
        query = query.where(Device.firmware_version == firmware_version)
    if mac is not None:
        query = query.where(Device.mac == mac)
    return page(session, query, DevicePublic, order_by=(Device.created_at, Device.id),
                limit=limit, offset=offset)


def gateway_keys(session: Session, box: SecretBox, gateway: Gateway) -> GatewayKeys:
    """The keys of the active devices at the gateway's site, as the gateway's key file has them."""
    devices = session.exec(
        select(Device)
        .where(Device.site_id == gateway.site_id, Device.state == DeviceState.active)
        .order_by(Device.wire_id)
    ).all()
    return GatewayKeys(devices=[
        GatewayKey(
            device_id=device.wire_id,
            key_id=device.key_id,
            secret=box.open(device.secret_enc, context=_secret_context(device.id, device.key_id))
            .hex(),
        )
        for device in devices
        if device.secret_enc is not None
    ])
