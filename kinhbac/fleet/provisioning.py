"""Device identities: registration by MAC (one, or many from a CSV file), claims made with a
site's claim key (pending until an admin approves or rejects them), re-provisioning,
revocation, CONFIG settings for nodes, and the listing a gateway fetches for its site.

A device's secret is returned once, to whoever registered it, and then stored only sealed
with the service key; it is opened again only for a gateway enrolled at the device's site.
"""

import contextlib
import csv
import io
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, Field, ValidationError
from sqlmodel import Session, select
from sqlmodel.sql.expression import SelectOfScalar

from kinhbac import wire
from kinhbac.fleet import audit, sites
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.errors import Conflict, FleetError, Invalid
from kinhbac.fleet.identity import WIRE_ID_PREFIX, normalise_mac, wire_id_for
from kinhbac.fleet.models import (
    MAX_KEY_ID,
    ApprovedClaim,
    AuditEntry,
    ClaimAnswer,
    ClaimCreate,
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
    NodeConfigUpdate,
    Page,
    PendingConfig,
    PreviousClaimKey,
    Site,
    utcnow,
)
from kinhbac.fleet.store import commit, get_or_404, page

SECRET_BYTES = 32  # HMAC-SHA256 key: the hash's block-size half, as the emulator issues
MAX_PENDING_PER_SITE = 100  # pending claims a site holds: a claim key cannot flood the registry


def _secret_context(device_id: uuid.UUID, key_id: int) -> bytes:
    # Bound to the key id too: a sealed key 1 cannot be passed off as key 2.
    return b"device secret " + device_id.bytes + key_id.to_bytes(2, "big")


def _check_site(session: Session, site_id: uuid.UUID | None) -> None:
    if site_id is not None and session.get(Site, site_id) is None:
        raise Invalid("site_id", f"no site {site_id}")


def _provisioned(device: Device, secret: bytes) -> DeviceProvisioned:
    return DeviceProvisioned.model_validate(device, update={"secret": secret.hex()})


def _save_change(session: Session, actor: Actor, device: Device, action: str,
                 before: dict) -> Device:
    """Commit a change to `device` with its audit entry (`before` and after), in one
    transaction; returns the device as stored."""
    device.updated_at = utcnow()
    session.add(device)
    audit.record(session, actor, action, "device", device.id,
                 before=before, after=audit.snapshot(device, DevicePublic))
    commit(session, "the device changed meanwhile; try again")
    session.refresh(device)
    return device


def register_device(
    session: Session, box: SecretBox, actor: Actor, data: DeviceCreate
) -> DeviceProvisioned:
    """A new device with wire id "kb"+MAC, key id 1 and a fresh secret (returned this once)."""
    existing = session.exec(select(Device).where(Device.mac == data.mac)).first()
    if existing is not None:
        # No id in the answer: a technician limited to one site may be told the MAC is taken
        # (it must be unique), but not the id of a device at a site it cannot see.
        raise Conflict(f"a device with MAC {data.mac} is already registered: find it with "
                       f"GET /api/devices?mac={data.mac} (or `kinhbac device show {data.mac}`) "
                       "if it is at one of your sites, or ask an admin")
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
    return _save_change(session, actor, device, "device.update", before)


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
            claim_nonce=None,  # its secret is random from now on, not derived from a claim
            claim_key_fingerprint=None,
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
    return _save_change(session, actor, device, "device.revoke", before)


def delete_device(session: Session, actor: Actor, device_id: uuid.UUID) -> None:
    """Remove a device no gateway has ever heard from: a registration that did not reach its
    board (the technician's tool rolls back with this). A device that has been heard keeps
    its record (and its history): revoke it instead."""
    device = get_or_404(session, Device, device_id, "device")
    if device.last_seen_at is not None or device.status is not None:
        raise Conflict(f"device {device.mac} has been heard from by a gateway: revoke it "
                       "instead (its record stays, with its history)")
    audit.record(session, actor, "device.delete", "device", device.id,
                 before=audit.snapshot(device, DevicePublic))
    session.delete(device)
    commit(session, "the device changed meanwhile; try again")


def list_devices(
    session: Session,
    visible: SelectOfScalar[Device],
    *,
    site_id: uuid.UUID | None = None,
    tag: str | None = None,
    state: DeviceState | None = None,
    firmware_version: str | None = None,
    mac: str | None = None,
    from_claim: bool | None = None,
    limit: int,
    offset: int,
) -> Page[DevicePublic]:
    """A page of `visible` (a select of Device, already narrowed to the caller's sites),
    filtered; oldest first."""
    query = filter_devices(visible, site_id=site_id, tag=tag, state=state,
                           firmware_version=firmware_version, mac=mac, from_claim=from_claim)
    return page(session, query, DevicePublic, order_by=(Device.created_at, Device.id),
                limit=limit, offset=offset)


# Any select over Device: the API selects devices, the console devices with their site and state.
S = TypeVar("S", bound=sa.Select[Any])


def filter_devices(
    query: S,
    *,
    site_id: uuid.UUID | None = None,
    tag: str | None = None,
    state: DeviceState | None = None,
    firmware_version: str | None = None,
    mac: str | None = None,
    from_claim: bool | None = None,
) -> S:
    """`query` (any select over Device) narrowed by the registry's filters; the API's list and
    the console's both ask this, so a filter means the same in each."""
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
    if from_claim is not None:
        query = query.where(Device.claim_nonce.is_not(None) if from_claim
                            else Device.claim_nonce.is_(None))
    return query


def gateway_keys(session: Session, box: SecretBox, gateway: Gateway) -> GatewayKeys:
    """What the gateway's site needs: the keys of its active devices (as the gateway's key
    file has them), its claim key, the claims approved there, and CONFIG for its nodes."""
    site = session.get(Site, gateway.site_id)
    assert site is not None  # a gateway's site cannot be deleted under it (ON DELETE CASCADE)
    devices = session.exec(
        select(Device)
        .where(Device.site_id == gateway.site_id, Device.state == DeviceState.active)
        .order_by(Device.wire_id)
    ).all()
    keyed = [device for device in devices if device.secret_enc is not None]
    claim_keys = sites.accepted_claim_keys(box, site)
    return GatewayKeys(
        devices=[
            GatewayKey(
                device_id=device.wire_id,
                key_id=device.key_id,
                secret=box.open(device.secret_enc,
                                context=_secret_context(device.id, device.key_id)).hex(),
            )
            for device in keyed
        ],
        claim_key=claim_keys[0].key,
        previous_claim_key=next(
            (PreviousClaimKey(claim_key=key.key, expires_at=key.expires_at)
             for key in claim_keys[1:] if key.expires_at is not None), None),
        claims=[
            ApprovedClaim(device_id=device.wire_id, nonce=device.claim_nonce,
                          key_id=device.key_id)
            for device in keyed if device.claim_nonce is not None
        ],
        configs=[
            PendingConfig(device_id=device.wire_id, settings=device.node_config)
            for device in devices if device.node_config
        ],
    )


# ---- claims: a node with only its site's claim key introduces itself at a gateway


def record_claim(session: Session, gateway: Gateway, actor: Actor, claim: ClaimCreate, *,
                 box: SecretBox | None = None,
                 max_pending: int = MAX_PENDING_PER_SITE) -> ClaimAnswer:
    """Take a claim the gateway verified with its site's claim key, and say where it stands.

    A device the fleet does not know becomes pending at the gateway's site, pinned to the
    claim's nonce and claim key; a pre-registered one is pinned by its first claim (at its own
    site). Nothing else a claim can change: a pending device's nonce, site and claim key stay
    the first claim's (another is refused and audited as `device.claim_conflict`, for the admin
    who decides), a rejected device stays rejected, and a device with an identity (or revoked)
    is refused, so that holding the claim key is not enough to take over a device. A claim
    under a key the site no longer takes (rotated out, past its overlap) is refused. A site
    holds at most `max_pending` pending devices.

    Without `box` (the test factories) the claim's key is not checked, and the claim counts as
    made under the site's current key.
    """
    mac = ":".join(f"{b:02x}" for b in bytes.fromhex(claim.device_id)[len(WIRE_ID_PREFIX):])
    try:
        mac = normalise_mac(mac)
    except ValueError as exc:
        raise Invalid("device_id", str(exc)) from None
    fingerprint: str | None = None
    current: str | None = None
    if box is not None:
        site = session.get(Site, gateway.site_id)
        assert site is not None  # a gateway's site cannot be deleted under it (ON DELETE CASCADE)
        accepted = [key.fingerprint for key in sites.accepted_claim_keys(box, site)]
        fingerprint, current = claim.claim_key_fingerprint or accepted[0], accepted[0]
        if fingerprint not in accepted:
            return ClaimAnswer(device_id=claim.device_id, state="refused",
                               detail="signed with a claim key this site no longer takes (it "
                               "was rotated, and its overlap is over): set the board up again "
                               "with the site's current profile")
    device = session.exec(select(Device).where(Device.mac == mac)).first()
    if device is None:
        pending = session.exec(select(sa.func.count()).select_from(Device).where(
            Device.site_id == gateway.site_id, Device.state == DeviceState.pending)).one()
        if pending >= max_pending:
            return ClaimAnswer(device_id=claim.device_id, state="refused",
                               detail=f"the site has {pending} pending claims, the most it "
                               "takes: approve or reject them first")
        device = Device(mac=mac, wire_id=claim.device_id, site_id=gateway.site_id,
                        state=DeviceState.pending, claim_nonce=claim.nonce,
                        claim_key_fingerprint=fingerprint, firmware_version=claim.fw_version)
        session.add(device)
        audit.record(session, actor, "device.claim", "device", device.id,
                     after=audit.snapshot(device, DevicePublic))
        # A Conflict: another gateway recorded the same claim at the same moment.
        with contextlib.suppress(Conflict):
            commit(session, "claimed meanwhile")
        return ClaimAnswer(device_id=claim.device_id, state="pending",
                           detail="awaiting an admin's approval")
    answer = _claim_standing(device, gateway, claim)
    if answer is not None:
        return answer
    # Pending or pre-registered: the first claim is the one an approval answers. A later one
    # with another nonce, from another site, or under the other of two claim keys (the same
    # nonce, heard on the air, signed with an old key someone kept) may be an attacker holding
    # a claim key: the approval would derive a secret from that key.
    pinned_site = device.site_id is not None and device.site_id != gateway.site_id
    pinned_nonce = device.claim_nonce is not None and device.claim_nonce != claim.nonce
    pinned_key = device.claim_nonce is not None and fingerprint is not None \
        and (device.claim_key_fingerprint or current) != fingerprint
    if pinned_site or pinned_nonce or pinned_key:
        audit.record(session, actor, "device.claim_conflict", "device", device.id, after={
            "nonce": claim.nonce, "gateway": gateway.name, "site_id": str(gateway.site_id),
            "pending_nonce": device.claim_nonce, "claim_key_fingerprint": fingerprint,
            "pending_claim_key_fingerprint": device.claim_key_fingerprint})
        commit(session, "claimed meanwhile")
        what = ("another site" if pinned_site else "another nonce" if pinned_nonce
                else "another claim key")
        return ClaimAnswer(device_id=claim.device_id, state="refused",
                           detail=f"this device is claimed with {what}: an admin approves, "
                           "rejects or deletes that claim first")
    if (device.claim_nonce, device.site_id, device.state) != (
            claim.nonce, gateway.site_id, DeviceState.pending):
        before = audit.snapshot(device, DevicePublic)
        device.claim_nonce = claim.nonce
        device.claim_key_fingerprint = fingerprint or device.claim_key_fingerprint
        device.site_id = gateway.site_id
        device.state = DeviceState.pending
        device.firmware_version = claim.fw_version or device.firmware_version
        _save_change(session, actor, device, "device.claim", before)
    return ClaimAnswer(device_id=claim.device_id, state="pending",
                       detail="awaiting an admin's approval")


def _claim_standing(device: Device, gateway: Gateway, claim: ClaimCreate) -> ClaimAnswer | None:
    """The answer for a device a claim cannot make pending; None when it can."""
    def answer(state: str, detail: str) -> ClaimAnswer:
        return ClaimAnswer(device_id=claim.device_id, state=state, detail=detail)

    if device.state == DeviceState.rejected:
        return answer("rejected", f"an admin rejected device {device.mac}")
    if device.state == DeviceState.revoked:
        return answer("refused", f"device {device.mac} is revoked: re-provision it to use it "
                      "again")
    if device.state == DeviceState.active:
        if device.claim_nonce == claim.nonce and device.site_id == gateway.site_id:
            return answer("approved", f"approved under key id {device.key_id}")
        return answer("refused", f"device {device.mac} already has an identity: flash it "
                      "with its own identity, or re-provision it")
    return None


def approve_claim(session: Session, box: SecretBox, actor: Actor,
                  device_id: uuid.UUID) -> Device:
    """Give a pending device its identity: the next key id, and the secret its claim derives
    from the claim key it was made under (both ends compute it; it never crosses the
    network). A claim under a key its site no longer takes cannot be approved: the board holds
    only that key, so it must be set up again."""
    device = get_or_404(session, Device, device_id, "device", lock=True)
    if device.state != DeviceState.pending or device.claim_nonce is None:
        raise Conflict(f"device {device.mac} is {device.state.value}: only a pending claim "
                       "can be approved")
    site = session.get(Site, device.site_id) if device.site_id is not None else None
    if site is None:
        raise Conflict(f"device {device.mac} has no site: set its site, then approve it")
    if device.key_id >= MAX_KEY_ID:
        raise Conflict(f"device {device.mac} has used every key id up to {MAX_KEY_ID}")
    claim_key = sites.claim_key_for(box, site, device.claim_key_fingerprint)
    if claim_key is None:
        raise Conflict(f"device {device.mac} claimed under a claim key site {site.slug} no "
                       "longer takes (rotated out, past its overlap): set the board up again "
                       "with the site's current profile, delete this claim (DELETE "
                       f"/api/devices/{device.id}) and approve its next one")
    before = audit.snapshot(device, DevicePublic)
    key_id = device.key_id + 1
    secret = wire.claim_secret(claim_key.key.encode(),
                               bytes.fromhex(device.wire_id), bytes.fromhex(device.claim_nonce))
    device.key_id = key_id
    device.secret_enc = box.seal(secret, context=_secret_context(device.id, key_id))
    device.state = DeviceState.active
    return _save_change(session, actor, device, "device.approve", before)


def reject_claim(session: Session, actor: Actor, device_id: uuid.UUID) -> Device:
    """Keep a pending device out: its claims are answered `rejected` from now on."""
    device = get_or_404(session, Device, device_id, "device", lock=True)
    if device.state != DeviceState.pending:
        raise Conflict(f"device {device.mac} is {device.state.value}: only a pending claim "
                       "can be rejected")
    before = audit.snapshot(device, DevicePublic)
    device.state = DeviceState.rejected
    return _save_change(session, actor, device, "device.reject", before)


def set_node_config(session: Session, actor: Actor, device_id: uuid.UUID,
                    data: NodeConfigUpdate) -> Device:
    """Settings the device's gateway delivers on its next connection ({} clears them)."""
    device = get_or_404(session, Device, device_id, "device")
    before = audit.snapshot(device, DevicePublic)
    device.node_config = data.settings or None
    return _save_change(session, actor, device, "device.config", before)


# ---- bulk pre-registration from CSV

BULK_MAX_BYTES = 1024 * 1024
BULK_MAX_ROWS = 10_000
BULK_COLUMNS = ("mac", "site", "board", "chip", "flash_size", "tags")
BULK_REQUIRED = ("mac",)
BULK_MAX_ERRORS = 1000  # a file wrong in one way throughout needs no 10,000-entry answer
_FLASH_SIZE = re.compile(r"^(\d+)\s*(?:(k|kb|kib)|(m|mb|mib))?$", re.IGNORECASE)
_IN_CHUNK = 500  # values per IN (...): well inside SQLite's and PostgreSQL's parameter limits


class TooLarge(FleetError):
    """A bulk file over the size or row limit."""

    status = 413


class BulkRowError(BaseModel):
    """One problem of a bulk file: where (row and column, as a spreadsheet shows them) and what."""

    loc: list[str | int] = Field(description='["body"], ["body", row] or ["body", row, column]')
    row: int | None = Field(description="the header is row 1; None for the file as a whole")
    column: str | None
    msg: str
    type: str


class BulkRefusal(BaseModel):
    """A refused bulk file: every problem found; nothing was written."""

    detail: list[BulkRowError]


class BulkInvalid(Exception):
    """The file's problems; the API answers 422 with them and writes nothing."""

    def __init__(self, errors: list[BulkRowError]) -> None:
        super().__init__(f"{len(errors)} problems")
        self.errors = errors


class BulkProvisioned(BaseModel):
    created: int
    devices: list[DeviceProvisioned] = Field(
        description="in the file's order, each with its secret: shown this once"
    )


@dataclass
class _BulkRow:
    row: int
    mac: str | None  # normalised; None when missing or malformed
    site: str | None
    data: dict[str, object]
    valid: bool


def _problem(row: int | None, column: str | None, msg: str, kind: str) -> BulkRowError:
    loc: list[str | int] = ["body"]
    if row is not None:
        loc += [row] if column is None else [row, column]
    return BulkRowError(loc=loc, row=row, column=column, msg=msg, type=kind)


def _refuse(errors: list[BulkRowError]) -> BulkInvalid:
    if len(errors) > BULK_MAX_ERRORS:
        more = len(errors) - BULK_MAX_ERRORS
        errors = errors[:BULK_MAX_ERRORS] + [
            _problem(None, None, f"and {more} more problems not listed", "truncated")
        ]
    return BulkInvalid(errors)


def _flash_size(text: str) -> int:
    """Bytes, or a size as esptool prints it: 4MB, 4M, 4MiB, 512KB (binary multiples)."""
    found = _FLASH_SIZE.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a flash size: give bytes (4194304) or e.g. 4MB")
    number, kib, mib = found.groups()
    return int(number) * (1024 if kib else 1024 * 1024 if mib else 1)


def _csv_records(body: bytes) -> list[list[str]]:
    """The records of a UTF-8 CSV body (a byte-order mark is fine); BulkInvalid if it is not one."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _refuse([_problem(
            None, None,
            f"not UTF-8 text (byte 0x{body[exc.start]:02x} at offset {exc.start}): "
            "save or export the sheet as CSV, UTF-8", "encoding",
        )]) from None
    if "\x00" in text:
        raise _refuse([_problem(None, None, "not CSV text: it holds NUL characters "
                                "(a binary file?)", "not_csv")])
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[list[str]] = []
    try:
        records.extend(reader)  # what was read before an error stays: it tells the row
    except csv.Error as exc:
        row = len(records) + 1
        raise _refuse([_problem(row, None, f"not valid CSV at row {row}: {exc}",
                                "not_csv")]) from None
    return records


def _read_header(record: list[str] | None) -> tuple[list[str], list[BulkRowError]]:
    if record is None or not any(name.strip() for name in record):
        return [], [_problem(1, None, "the first row must name the columns, e.g. "
                             + ",".join(BULK_COLUMNS), "missing_header")]
    names = [name.strip().lower() for name in record]
    errors = []
    for index, name in enumerate(names, start=1):
        if not name:
            errors.append(_problem(1, None, f"column {index} has no name", "unknown_column"))
        elif name not in BULK_COLUMNS:
            errors.append(_problem(1, name, f"unknown column {name!r}; the columns are "
                                   + ", ".join(BULK_COLUMNS), "unknown_column"))
        elif name in names[:index - 1]:
            errors.append(_problem(1, name, f"column {name!r} is named twice", "duplicate_column"))
    for name in BULK_REQUIRED:
        if name not in names:
            errors.append(_problem(1, name, f"missing required column {name!r}",
                                   "missing_column"))
    return names, errors


def _read_row(number: int, names: list[str], record: list[str],
              errors: list[BulkRowError]) -> _BulkRow:
    """Row `number`'s device; its problems go to `errors` (and `valid` says whether it had any)."""
    found = len(errors)
    if len(record) > len(names):
        errors.append(_problem(number, None, f"{len(record)} values, but the header names "
                               f"{len(names)} columns", "too_many_values"))
    values = {name: value.strip() for name, value in zip(names, record, strict=False)}
    data: dict[str, object] = {"mac": values.get("mac", "")}
    for name in ("board", "chip"):
        if values.get(name):
            data[name] = values[name]
    if values.get("flash_size"):
        try:
            data["flash_size"] = _flash_size(values["flash_size"])
        except ValueError as exc:
            errors.append(_problem(number, "flash_size", str(exc), "flash_size"))
    tags = [tag.strip() for tag in values.get("tags", "").split(";") if tag.strip()]
    if tags:
        data["tags"] = tags
    mac_given = bool(data["mac"])
    if not mac_given:
        errors.append(_problem(number, "mac", "no MAC: the mac column is required",
                               "missing_value"))
        data["mac"] = "02:00:00:00:00:01"  # a stand-in, so that the other columns are checked
    mac_ok = mac_given
    try:
        data = DeviceCreate.model_validate(data).model_dump(exclude_unset=True)
    except ValidationError as exc:
        for error in exc.errors():
            column = str(error["loc"][0]) if error["loc"] else None
            mac_ok = mac_ok and column != "mac"
            errors.append(_problem(number, column, error["msg"].removeprefix("Value error, "),
                                   error["type"]))
    return _BulkRow(row=number, mac=normalise_mac(str(data["mac"])) if mac_ok else None,
                    site=values.get("site") or None, data=data, valid=len(errors) == found)


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start:start + _IN_CHUNK]


def read_device_csv(session: Session, body: bytes) -> list[DeviceCreate]:
    """The devices a bulk CSV describes, checked against each other and the registry.

    BulkInvalid lists every problem (row, column, what); TooLarge for more than BULK_MAX_ROWS.
    """
    if len(body) > BULK_MAX_BYTES:
        raise TooLarge(f"the file is larger than {BULK_MAX_BYTES} bytes: split it")
    records = _csv_records(body)
    names, errors = _read_header(records[0] if records else None)
    if errors:
        raise _refuse(errors)
    numbered = [(number, record) for number, record in enumerate(records[1:], start=2)
                if any(value.strip() for value in record)]  # blank lines are skipped
    if len(numbered) > BULK_MAX_ROWS:
        raise TooLarge(f"{len(numbered)} devices in one file, more than {BULK_MAX_ROWS}: "
                       "split it")
    if not numbered:
        errors.append(_problem(None, None, "no devices: the file has a header and no rows",
                               "empty"))
    rows: list[_BulkRow] = []
    seen: dict[str, int] = {}
    for number, record in numbered:
        row = _read_row(number, names, record, errors)
        rows.append(row)
        if row.mac is None:
            continue
        if row.mac in seen:
            errors.append(_problem(number, "mac", f"MAC {row.mac} is also on row "
                                   f"{seen[row.mac]}", "duplicate_mac"))
        else:
            seen[row.mac] = number
    for chunk in _chunks(list(seen)):
        for mac, device_id in session.exec(
            select(Device.mac, Device.id).where(Device.mac.in_(chunk))
        ):
            errors.append(_problem(seen[mac], "mac", f"a device with MAC {mac} is already "
                                   f"registered (id {device_id})", "already_registered"))
    slugs = sorted({row.site for row in rows if row.site})
    site_ids: dict[str, uuid.UUID] = {}
    for chunk in _chunks(slugs):
        rows_found = session.exec(select(Site.slug, Site.id).where(Site.slug.in_(chunk))).all()
        site_ids.update((slug, site_id) for slug, site_id in rows_found)
    for row in rows:
        if row.site and row.site not in site_ids:
            errors.append(_problem(row.row, "site", f"no site with slug {row.site!r}",
                                   "unknown_site"))
    if errors:
        errors.sort(key=lambda error: (error.row or 0, BULK_COLUMNS.index(error.column)
                                       if error.column in BULK_COLUMNS else -1))
        raise _refuse(errors)
    return [
        DeviceCreate.model_validate({**row.data, "site_id": site_ids.get(row.site or "")})
        for row in rows
    ]


def register_bulk(
    session: Session, box: SecretBox, actor: Actor, devices: list[DeviceCreate]
) -> BulkProvisioned:
    """Register every device of a checked bulk file in one transaction, or none of them.

    Each device is what register_device() makes (active, key id 1, a fresh secret, a
    `device.create` audit entry), written as rows with one INSERT per table: ten thousand
    ORM objects would take long enough for a client to give up.
    """
    # The audit entries are audit.record()'s, one per device: made once, copied per device.
    template = audit.record(session, actor, "device.create", "device", "")
    session.expunge(template)
    entry = {column.name: getattr(template, column.name) for column in AuditEntry.__table__.columns}
    device_columns = [column.name for column in Device.__table__.columns]
    device_rows: list[dict[str, object]] = []
    tag_rows: list[dict[str, object]] = []
    audit_rows: list[dict[str, object]] = []
    answers = []
    for data in devices:
        secret = os.urandom(SECRET_BYTES)
        device_id = uuid.uuid4()
        device = Device.model_validate(data.model_dump(exclude={"tags"}), update={
            "id": device_id,
            "wire_id": wire_id_for(data.mac),
            "key_id": 1,
            "secret_enc": box.seal(secret, context=_secret_context(device_id, 1)),
            "state": DeviceState.active,
        })
        answer = DeviceProvisioned.model_validate(
            device, update={"tags": data.tags, "secret": secret.hex()}
        )
        answers.append(answer)
        device_rows.append({name: getattr(device, name) for name in device_columns})
        tag_rows += [{"device_id": device_id, "tag": tag} for tag in data.tags]
        audit_rows.append({**entry, "id": uuid.uuid4(), "entity_id": str(device_id),
                           "after": audit.scrub(answer.model_dump(mode="json"))})
    conflict = "a device of the file was registered meanwhile; nothing was written, try again"
    connection = session.connection()
    try:
        connection.execute(Device.__table__.insert(), device_rows)
        if tag_rows:
            connection.execute(DeviceTag.__table__.insert(), tag_rows)
        connection.execute(AuditEntry.__table__.insert(), audit_rows)
    except sa.exc.IntegrityError as exc:
        session.rollback()
        raise Conflict(conflict) from exc
    commit(session, conflict)
    return BulkProvisioned(created=len(answers), devices=answers)
