"""Factories for the fleet tests: users with tokens, sites, gateways, devices, releases."""

import functools
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from sqlmodel import Session, select

from kinhbac.claim_keys import fingerprint
from kinhbac.fleet import provisioning, releases, security, sites, uploads
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.errors import Conflict
from kinhbac.fleet.models import (
    ApiToken,
    ClaimCreate,
    Device,
    DeviceCreate,
    DeviceProvisioned,
    Gateway,
    ReleaseDetail,
    GatewayCreate,
    Role,
    Site,
    SiteCreate,
    TokenKind,
    User,
)
from kinhbac.fleet.security import (
    GATEWAY_TOKEN_PREFIX,
    USER_TOKEN_PREFIX,
    hash_password,
    hash_token,
    new_token,
)

PASSWORD = "correct horse battery"
SECRET_KEY = "test-service-key-" + "k" * 32
KIT = [
    {"name": "temperature", "unit": "C", "kind": "bme280", "field": "temperature"},
    {"name": "level", "unit": "m", "kind": "adc", "pin": 34, "scale": 1.5},
]


@functools.cache
def password_hash() -> str:
    """PASSWORD hashed once: Argon2 is slow on purpose, and the factories need many users."""
    return hash_password(PASSWORD)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def random_mac() -> str:
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered: never a real device's
    return ":".join(f"{b:02x}" for b in raw)


def make_user(session: Session, role: Role, *, email: str | None = None,
              is_active: bool = True, commit: bool = True,
              sites: Sequence[Site] = ()) -> tuple[User, str]:
    """A user with PASSWORD, limited to `sites` (none: city-wide), and an API token for it."""
    user = User(email=email or f"{role.value}-{uuid.uuid4().hex[:8]}@example.org", role=role,
                is_active=is_active, password_hash=password_hash())
    user.set_sites([site.id for site in sites])
    session.add(user)
    session.flush()  # the token refers to it, and no ORM relationship orders the two
    token, _ = make_token(session, user, commit=commit)
    return user, token


def make_token(session: Session, user: User, *, commit: bool = True,
               sites: Sequence[Site] = (), **fields: object) -> tuple[str, ApiToken]:
    """A bearer token for `user`, limited to `sites` (none: all of the user's), and its row."""
    token = new_token(USER_TOKEN_PREFIX)
    row = ApiToken(name="test", user_id=user.id, kind=TokenKind.api,
                   token_hash=hash_token(token), **fields)
    row.set_sites([site.id for site in sites])
    session.add(row)
    if commit:
        session.commit()
    return token, row


def make_site(session: Session, box: SecretBox, slug: str | None = None, **fields: object) -> Site:
    """A site with a full profile; `fields` replace any of its values."""
    data = SiteCreate.model_validate({
        "name": "Riverside pumping station", "slug": slug or f"site-{uuid.uuid4().hex[:8]}",
        "wifi_ssid": "kinhbac-field", "wifi_password": "field-password",
        "gateway_host": "10.0.0.2", "gateway_port": 7878, "sensor_kit": KIT,
    } | fields)
    return sites.create_site(session, box, CLI, data)


def make_gateway(session: Session, site: Site, name: str = "gw1") -> tuple[Gateway, str]:
    enrolled = sites.enrol_gateway(session, CLI, GatewayCreate(name=name, site_id=site.id))
    return session.get(Gateway, enrolled.id), enrolled.token


def make_device(session: Session, box: SecretBox, site: Site | None = None,
                **fields: object) -> DeviceProvisioned:
    fields.setdefault("mac", random_mac())
    data = DeviceCreate(site_id=site.id if site else None, **fields)
    return provisioning.register_device(session, box, CLI, data)


def make_release(session: Session, app: FastAPI, kind: str = "bundle",
                 version: str | None = None,
                 files: dict[str, bytes] | None = None) -> ReleaseDetail:
    """A release recorded as an upload makes one (files kept, manifest signed), by the CLI;
    `files`: board path (or any name, for an image) -> bytes."""
    if files is None:
        files = {"/lib/node/app.mpy": b"app " + os.urandom(16), "/lib/wire.mpy": b"wire"}
    store = app.state.artifacts
    upload = uploads.Upload(fields={"kind": kind, "version": version or
                                    f"0.{uuid.uuid4().int % 10**6}.0"})
    for name, data in files.items():
        incoming = store.incoming()
        incoming.write(data)
        upload.files.append(uploads.ReceivedFile(name, incoming))
    try:
        return releases.create_release(session, store, app.state.release_signer, CLI, upload)
    finally:
        upload.discard()


@dataclass
class Callers:
    """Users of each role and a gateway, with their bearer tokens (caller name -> token).

    Three callers are limited to sites: a technician and a viewer limited to the callers'
    site (and any `also` sites), and a technician limited to those and `other_site` whose
    token is limited to those alone. Whatever is at `other_site` is beyond all three.
    """

    admin: User
    technician: User
    viewer: User
    site: Site
    gateway: Gateway
    other_site: Site
    tokens: dict[str, str]


def _bare_site(session: Session, box: SecretBox, name: str) -> Site:
    site_id = uuid.uuid4()
    site = Site(id=site_id, name=name, slug=f"site-{uuid.uuid4().hex[:8]}",
                claim_key_enc=box.seal(name.encode() + b" claim key",
                                       context=sites._claim_context(site_id)))
    session.add(site)
    return site


def make_callers(session: Session, box: SecretBox, *, also: Sequence[Site] = ()) -> Callers:
    """Callers of every kind, in one commit: the role matrix makes these for each of its cells.
    The callers limited to sites are limited to the callers' site and `also`."""
    admin, admin_token = make_user(session, Role.admin, commit=False)
    technician, technician_token = make_user(session, Role.technician, commit=False)
    viewer, viewer_token = make_user(session, Role.viewer, commit=False)
    site = _bare_site(session, box, "Callers' site")
    other_site = _bare_site(session, box, "Another site")
    session.flush()
    own = [site, *also]
    _, site_technician_token = make_user(session, Role.technician, sites=own, commit=False)
    _, site_viewer_token = make_user(session, Role.viewer, sites=own, commit=False)
    wider, _ = make_user(session, Role.technician, sites=[*own, other_site], commit=False)
    site_token, _ = make_token(session, wider, sites=own, commit=False)
    gateway_token = new_token(GATEWAY_TOKEN_PREFIX)
    gateway = Gateway(name="gw1", site_id=site.id, token_hash=hash_token(gateway_token))
    session.add(gateway)
    session.commit()
    return Callers(
        admin=admin, technician=technician, viewer=viewer, site=site, gateway=gateway,
        other_site=other_site,
        tokens={"admin": admin_token, "technician": technician_token, "viewer": viewer_token,
                "gateway": gateway_token, "site technician": site_technician_token,
                "site viewer": site_viewer_token, "site token technician": site_token},
    )


def limit_to(session: Session, user: User, sites: Sequence[Site]) -> None:
    """Limit `user` to `sites` from its next request on."""
    user.set_sites([site.id for site in sites])
    session.add(user)
    session.commit()


@dataclass
class World:
    """One of everything, for calls that must succeed: the callers, a site with a profile,
    a device at it, and a spare API token; the same again at the callers' other site, beyond
    the callers limited to sites (`elsewhere()`)."""

    callers: Callers
    site: Site
    device: DeviceProvisioned
    spare_token_id: uuid.UUID
    pending_device_id: uuid.UUID  # claimed at the callers' gateway, awaiting a decision
    gateway: Gateway
    # The same at the callers' other site, beyond the callers limited to sites.
    other: "World | None" = None
    release_id: uuid.UUID | None = None  # releases are city-wide: one for the whole world


def make_world(session: Session, box: SecretBox, app: FastAPI | None = None) -> World:
    site = make_site(session, box)
    callers = make_callers(session, box, also=[site])
    _, spare = make_token(session, callers.viewer)
    other_gateway, _ = make_gateway(session, callers.other_site)
    other = World(
        callers=callers, site=callers.other_site, spare_token_id=spare.id,
        device=make_device(session, box, callers.other_site),
        pending_device_id=make_pending_device(session, other_gateway), gateway=other_gateway)
    return World(callers=callers, site=site, device=make_device(session, box, site),
                 spare_token_id=spare.id, gateway=callers.gateway, other=other,
                 pending_device_id=make_pending_device(session, callers.gateway),
                 release_id=make_release(session, app).id if app is not None else None)


def make_pending_device(session: Session, gateway: Gateway) -> uuid.UUID:
    """A device that claimed an identity at `gateway`'s site; returns its id."""
    claim = ClaimCreate(device_id="6b62" + random_mac().replace(":", ""),
                        nonce=os.urandom(16).hex(), fw_version="0.1.0")
    provisioning.record_claim(session, gateway, CLI, claim)
    mac = ":".join(claim.device_id[i:i + 2] for i in range(4, 16, 2))
    return session.exec(select(Device.id).where(Device.mac == mac)).one()


def a_claim(mac: str | None = None, nonce: str | None = None, fw_version: str = "0.1.0", *,
            signed_with: str | None = None) -> dict[str, str]:
    """A node's CLAIM as a gateway reports it; `signed_with`: the claim key that verified it
    (its fingerprint goes in the report)."""
    claim = {"device_id": "6b62" + (mac or random_mac()).replace(":", ""),
             "nonce": nonce or os.urandom(16).hex(), "fw_version": fw_version}
    if signed_with is not None:
        claim["claim_key_fingerprint"] = fingerprint(signed_with.encode())
    return claim


@contextmanager
def quick_argon2() -> Iterator[None]:
    """Argon2id with its cheapest parameters while it lasts: the same code path and hash
    format, without spending the suites' time on deliberately slow hashing (the password hash
    every made user shares is cached, so a costly one would slow every later login too)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(security, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    security._dummy_hash.cache_clear()
    try:
        yield
    finally:
        mp.undo()
        security._dummy_hash.cache_clear()


def at_once(engine: Any, actions: Sequence[Callable[[Session], str]]) -> list[str]:
    """Run each action in a thread of its own, with a session of its own, all released at the
    same moment (two admins clicking together); each gives its outcome, a Conflict "refused".
    The outcomes in the order they finished."""
    barrier = threading.Barrier(len(actions))
    outcomes: list[str] = []

    def run(action: Callable[[Session], str]) -> None:
        with Session(engine) as own:
            barrier.wait()
            try:
                outcomes.append(action(own))
            except Conflict:
                outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes
