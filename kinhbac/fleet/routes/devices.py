"""The device registry and its provisioning paths: register by MAC, one or many (CSV).

A caller limited to sites sees only the devices at them, registers devices only there, and
cannot move a device elsewhere (kinhbac/fleet/deps.py): a device at another site is a 404.
"""

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from pydantic import AfterValidator
from sqlmodel import Session, select

from kinhbac.fleet import provisioning
from kinhbac.fleet.deps import (
    Admin,
    AnyUser,
    Limit,
    Offset,
    Principal,
    SecretBoxDep,
    SessionDep,
    Staff,
    check_placeable,
    visible_only,
    visible_or_404,
)
from kinhbac.fleet.identity import normalise_mac
from kinhbac.fleet.models import (
    Device,
    DeviceCreate,
    DeviceProvisioned,
    DevicePublic,
    DeviceState,
    DeviceUpdate,
    NodeConfigUpdate,
    Page,
    Site,
)

router = APIRouter(prefix="/api/devices", tags=["devices"])


@router.post("", response_model=DeviceProvisioned, status_code=status.HTTP_201_CREATED)
def register_device(
    data: DeviceCreate, session: SessionDep, box: SecretBoxDep, caller: Staff
) -> DeviceProvisioned:
    """Register a device by MAC: the fleet issues its wire id, key id 1 and secret.

    The secret is in this response only; the fleet keeps it encrypted for the gateways.
    """
    check_placeable(caller, data.site_id)
    return provisioning.register_device(session, box, caller.actor, data)


async def csv_body(request: Request) -> bytes:
    """The request body of a bulk registration: text/csv, at most BULK_MAX_BYTES.

    Read here, after the caller's role is checked, and no further than the limit.
    """
    media_type, _, parameters = request.headers.get("content-type", "").partition(";")
    if media_type.strip().lower() != "text/csv":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="send the CSV file as the request body with Content-Type: text/csv "
            f"(this request's is {media_type.strip() or 'missing'!r})",
        )
    charset = {
        key.strip().lower(): value.strip().strip('"').lower()
        for key, _, value in (item.partition("=") for item in parameters.split(";"))
    }.get("charset", "utf-8")
    if charset not in ("utf-8", "utf8", "us-ascii"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"the CSV must be UTF-8 (this request says charset={charset}): "
            "save or export it as CSV UTF-8",
        )
    too_large = HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        detail=f"the CSV file is larger than {provisioning.BULK_MAX_BYTES} bytes "
        f"({provisioning.BULK_MAX_BYTES // 1024 // 1024} MiB): split it into smaller files",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > provisioning.BULK_MAX_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > provisioning.BULK_MAX_BYTES:
            raise too_large
    return bytes(body)


_CSV_EXAMPLE = (
    "mac,site,board,chip,flash_size,tags\n"
    "24:0a:c4:12:34:56,riverside,devkitc,ESP32-D0WD-V3,4MB,pump;north\n"
)


@router.post(
    "/bulk",
    response_model=provisioning.BulkProvisioned,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": {
        "required": True,
        "description": "a UTF-8 CSV file whose first row names its columns: "
        + ", ".join(provisioning.BULK_COLUMNS) + " (only mac is required; tags are "
        "separated by ';'; flash_size in bytes or like 4MB)",
        "content": {"text/csv": {"schema": {"type": "string"}, "example": _CSV_EXAMPLE}},
    }},
    responses={
        413: {"description": "over 1 MiB or over 10,000 devices"},
        415: {"description": "not sent as text/csv (UTF-8)"},
        422: {"model": provisioning.BulkRefusal,
              "description": "every problem of the file, by row and column; nothing written"},
    },
)
def register_bulk(
    response: Response,
    session: SessionDep,
    box: SecretBoxDep,
    caller: Staff,
    body: Annotated[bytes, Depends(csv_body)],
) -> provisioning.BulkProvisioned:
    """Pre-register many devices from a CSV file: all of them, or none.

    Each device gets its wire id, key id 1 and a secret, as a single registration does, and is
    active. The secrets are in this response only. A file with any problem writes nothing and
    is answered 422 with every problem found, by row (the header is row 1) and column.
    """
    try:
        devices = provisioning.read_device_csv(session, body)
    except provisioning.BulkInvalid as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[error.model_dump() for error in exc.errors],
        ) from None
    _check_bulk_sites(session, caller, devices)
    response.headers["Cache-Control"] = "no-store"  # secrets: no proxy or cache keeps them
    return provisioning.register_bulk(session, box, caller.actor, devices)


@router.get("", response_model=Page[DevicePublic])
def list_devices(
    session: SessionDep,
    caller: AnyUser,
    site_id: uuid.UUID | None = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    state: DeviceState | None = None,
    firmware_version: Annotated[str | None, Query(max_length=64)] = None,
    mac: Annotated[str | None, AfterValidator(normalise_mac)] = None,
    from_claim: Annotated[bool | None, Query(
        description="true: only devices set up by a claim (each shows its claim key's "
        "fingerprint); false: only the others")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[DevicePublic]:
    """Devices, oldest first, filtered by site, tag, state, firmware version, MAC or whether a
    claim set them up; of the caller's sites only, for a caller limited to some."""
    return provisioning.list_devices(
        session, visible_only(select(Device), caller, Device), site_id=site_id, tag=tag,
        state=state, firmware_version=firmware_version, mac=mac, from_claim=from_claim,
        limit=limit, offset=offset)


def _check_bulk_sites(session: Session, caller: Principal, devices: list[DeviceCreate]) -> None:
    """Refuse a bulk file placing a device where the caller may not, listing every such device
    in the shape of the file's other problems; nothing is written. A site the caller does not
    see is named as the file's unknown slugs are."""
    refused = [device for device in devices if not caller.sees(device.site_id)]
    if not refused:
        return
    slugs = dict(session.exec(select(Site.id, Site.slug).where(
        Site.id.in_({device.site_id for device in refused if device.site_id}))).all())
    errors = [
        provisioning.BulkRowError(
            loc=["body"], row=None, column="site", type="unknown_site",
            msg=f"{device.mac}: " + (f"no site with slug {slugs[device.site_id]!r}"
                                     if device.site_id in slugs else
                                     "no site, and you are limited to some: give one of them"))
        for device in refused
    ]
    raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                        detail=[error.model_dump() for error in errors])


def _device(session: Session, caller: Principal, device_id: uuid.UUID) -> Device:
    return visible_or_404(session, caller, Device, device_id, "device")


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: uuid.UUID, session: SessionDep, caller: AnyUser) -> Device:
    return _device(session, caller, device_id)


@router.patch("/{device_id}", response_model=DevicePublic)
def update_device(
    device_id: uuid.UUID, data: DeviceUpdate, session: SessionDep, caller: Staff
) -> Device:
    """Change where a device is (site), its tags, or its hardware description."""
    _device(session, caller, device_id)
    if "site_id" in data.model_fields_set:
        check_placeable(caller, data.site_id)  # into another site, or out of the caller's
    return provisioning.update_device(session, caller.actor, device_id, data)


@router.post("/{device_id}/reprovision", response_model=DeviceProvisioned)
def reprovision_device(
    device_id: uuid.UUID, session: SessionDep, box: SecretBoxDep, caller: Staff
) -> DeviceProvisioned:
    """The next key id and a new secret (in this response only); the old key stops working."""
    _device(session, caller, device_id)
    return provisioning.reprovision(session, box, caller.actor, device_id)


@router.post("/{device_id}/revoke", response_model=DevicePublic)
def revoke_device(device_id: uuid.UUID, session: SessionDep, caller: Staff) -> Device:
    """Withdraw the device's credentials; gateways stop getting its key."""
    _device(session, caller, device_id)
    return provisioning.revoke(session, caller.actor, device_id)


@router.delete("/{device_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={409: {"description": "a gateway has heard from it: revoke it"}})
def delete_device(device_id: uuid.UUID, session: SessionDep, caller: Staff) -> Response:
    """Remove a device that no gateway has ever heard from (a registration that never reached
    its board); a device that has been heard is revoked instead, keeping its record."""
    _device(session, caller, device_id)
    provisioning.delete_device(session, caller.actor, device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{device_id}/approve", response_model=DevicePublic)
def approve_device(
    device_id: uuid.UUID, session: SessionDep, box: SecretBoxDep, caller: Admin
) -> Device:
    """Approve a pending claim: the device gets its own key id, and its site's gateways answer
    its next claim with its identity (within one of their refresh intervals)."""
    _device(session, caller, device_id)
    return provisioning.approve_claim(session, box, caller.actor, device_id)


@router.post("/{device_id}/reject", response_model=DevicePublic)
def reject_device(device_id: uuid.UUID, session: SessionDep, caller: Admin) -> Device:
    """Reject a pending claim: the device is kept out, and its claims are refused."""
    _device(session, caller, device_id)
    return provisioning.reject_claim(session, caller.actor, device_id)


@router.put("/{device_id}/config", response_model=DevicePublic)
def set_device_config(
    device_id: uuid.UUID, data: NodeConfigUpdate, session: SessionDep, caller: Staff
) -> Device:
    """Settings for the node, which its gateway sends as a CONFIG frame on the node's next
    connection (once per change); `{"settings": {}}` clears them."""
    _device(session, caller, device_id)
    return provisioning.set_node_config(session, caller.actor, device_id, data)
