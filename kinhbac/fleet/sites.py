"""Sites (with the profile a node is set up from) and the gateways enrolled at them."""

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac.claim_keys import fingerprint
from kinhbac.fleet import audit
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.errors import Conflict, Invalid
from kinhbac.fleet.models import (
    ClaimKeyRotation,
    Device,
    DeviceState,
    Gateway,
    GatewayCreate,
    GatewayEnrolled,
    GatewayPublic,
    Site,
    SiteCreate,
    SiteProfile,
    SitePublic,
    SiteUpdate,
    utcnow,
)
from kinhbac.fleet.security import GATEWAY_TOKEN_PREFIX, hash_token, new_token
from kinhbac.fleet.store import commit, get_or_404

_CLAIM_KEY_BYTES = 24  # a site-wide enrolment secret; 192 bits is plenty for a bearer secret


def _wifi_context(site_id: uuid.UUID) -> bytes:
    return b"site wifi password " + site_id.bytes


def _claim_context(site_id: uuid.UUID) -> bytes:
    return b"site claim key " + site_id.bytes


def create_site(session: Session, box: SecretBox, actor: Actor, data: SiteCreate) -> Site:
    if session.exec(select(Site).where(Site.slug == data.slug)).first() is not None:
        raise Conflict(f"a site with slug {data.slug} already exists")
    site_id = uuid.uuid4()  # the sealed secrets are bound to it
    claim_key = secrets.token_urlsafe(_CLAIM_KEY_BYTES)
    site = Site.model_validate(data, update={
        "id": site_id,
        "claim_key_enc": box.seal(claim_key.encode(), context=_claim_context(site_id)),
        "wifi_password_enc": None if data.wifi_password is None else box.seal(
            data.wifi_password.encode(), context=_wifi_context(site_id)),
    })
    session.add(site)
    audit.record(session, actor, "site.create", "site", site.id,
                 after=audit.snapshot(site, SitePublic))
    commit(session, f"a site with slug {data.slug} already exists")
    session.refresh(site)
    return site


def update_site(
    session: Session, box: SecretBox, actor: Actor, site_id: uuid.UUID, data: SiteUpdate
) -> Site:
    site = get_or_404(session, Site, site_id, "site")
    before = audit.snapshot(site, SitePublic)
    changes = data.model_dump(exclude_unset=True)
    wifi_password_set = "wifi_password" in changes
    wifi_password = changes.pop("wifi_password", None)
    for name, value in changes.items():
        if value is None and name in ("name", "sensor_kit"):
            raise Invalid(name, f"{name} cannot be null")
        setattr(site, name, value)
    if wifi_password_set:
        site.wifi_password_enc = (
            box.seal(wifi_password.encode(), context=_wifi_context(site.id))
            if wifi_password is not None else None
        )
    site.updated_at = utcnow()
    after = audit.snapshot(site, SitePublic)
    if wifi_password_set:
        after["wifi_password_changed"] = True
    audit.record(session, actor, "site.update", "site", site.id, before=before, after=after)
    session.add(site)
    commit(session, "the site changed meanwhile; try again")
    session.refresh(site)
    return site


def claim_key(box: SecretBox, site: Site) -> str:
    """The site's claim key, opened: what boards are flashed with from now on."""
    return box.open(site.claim_key_enc, context=_claim_context(site.id)).decode()


@dataclass(frozen=True)
class ClaimKey:
    """One claim key a site takes claims under, opened."""

    key: str
    expires_at: datetime | None  # None: the current key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key.encode())


def accepted_claim_keys(box: SecretBox, site: Site) -> list[ClaimKey]:
    """The keys the site takes claims under now: its current key, and the one a rotation
    replaced until that expires."""
    keys = [ClaimKey(claim_key(box, site), None)]
    expires_at = site.previous_claim_key_expires_at
    if site.previous_claim_key_enc is not None and expires_at is not None \
            and utcnow() < expires_at:
        # Sealed under the same context as the current key: a rotation moves it unopened.
        previous = box.open(site.previous_claim_key_enc, context=_claim_context(site.id))
        keys.append(ClaimKey(previous.decode(), expires_at))
    return keys


def claim_key_for(box: SecretBox, site: Site, key_fingerprint: str | None) -> ClaimKey | None:
    """The accepted key with this fingerprint (None: the current key); None if the site takes
    no claims under it (any more)."""
    keys = accepted_claim_keys(box, site)
    if key_fingerprint is None:
        return keys[0]
    return next((key for key in keys if key.fingerprint == key_fingerprint), None)


def rotate_claim_key(session: Session, box: SecretBox, actor: Actor, site_id: uuid.UUID,
                     data: ClaimKeyRotation, *, default_overlap_hours: float) -> Site:
    """A new claim key for the site. Claims under the old one are still taken for the overlap
    (boards flashed with a profile fetched before), then refused; a key from before an earlier
    rotation is dropped at once. The answer carries no key: staff fetch the profile."""
    site = get_or_404(session, Site, site_id, "site")
    before = audit.snapshot(site, SitePublic)
    hours = default_overlap_hours if data.overlap_hours is None else data.overlap_hours
    now = utcnow()
    old_key_enc = site.claim_key_enc
    # Claims recorded before claim keys had fingerprints were made under the key being
    # replaced: pin them to it, so that their approval still derives the board's secret.
    session.execute(
        sa.update(Device)
        .where(Device.site_id == site.id, Device.state == DeviceState.pending,
               Device.claim_key_fingerprint.is_(None))
        .values(claim_key_fingerprint=fingerprint(claim_key(box, site).encode()))
    )
    # Compare-and-set on the key: of two rotations at once, one is refused rather than both
    # answering and the first's key being lost.
    changed = session.execute(
        sa.update(Site)
        .where(Site.id == site.id, Site.claim_key_enc == old_key_enc)
        .values(
            claim_key_enc=box.seal(secrets.token_urlsafe(_CLAIM_KEY_BYTES).encode(),
                                   context=_claim_context(site.id)),
            previous_claim_key_enc=old_key_enc if hours > 0 else None,
            previous_claim_key_expires_at=now + timedelta(hours=hours) if hours > 0 else None,
            claim_key_rotated_at=now,
            updated_at=now,
        )
    )
    if changed.rowcount != 1:
        session.rollback()
        raise Conflict(f"the claim key of site {site.slug} was rotated meanwhile; try again")
    session.refresh(site)
    audit.record(session, actor, "site.rotate_claim_key", "site", site.id, before=before,
                 after=audit.snapshot(site, SitePublic) | {"overlap_hours": hours})
    commit(session, "the site changed meanwhile; try again")
    session.refresh(site)
    return site


def site_profile(box: SecretBox, site: Site) -> SiteProfile:
    """The site with its secrets opened, for the technician who sets a node up."""
    wifi_password = (
        box.open(site.wifi_password_enc, context=_wifi_context(site.id)).decode()
        if site.wifi_password_enc is not None else None
    )
    key = claim_key(box, site)
    return SiteProfile.model_validate(site, update={
        "wifi_password": wifi_password, "claim_key": key,
        "claim_key_fingerprint": fingerprint(key.encode())})


def read_profile(session: Session, box: SecretBox, actor: Actor, site: Site) -> SiteProfile:
    """The site's profile, secrets opened, for `actor`, with the read in the audit log
    (`site.profile_read`): after a laptop is lost, the log says which sites' secrets it could
    hold. The API's profile route and the console's Reveal both read it here."""
    profile = site_profile(box, site)
    audit.record_secret_read(session, actor, "site.profile_read", "site", site.id)
    return profile


def enrol_gateway(session: Session, actor: Actor, data: GatewayCreate) -> GatewayEnrolled:
    """A gateway at a site, with its token (shown once, stored hashed)."""
    site = session.get(Site, data.site_id)
    if site is None:
        raise Invalid("site_id", f"no site {data.site_id}")
    taken = session.exec(
        select(Gateway).where(Gateway.site_id == site.id, Gateway.name == data.name)
    ).first()
    if taken is not None:
        raise Conflict(f"site {site.slug} already has a gateway named {data.name}")
    token = new_token(GATEWAY_TOKEN_PREFIX)
    gateway = Gateway.model_validate(data, update={"token_hash": hash_token(token)})
    session.add(gateway)
    audit.record(session, actor, "gateway.create", "gateway", gateway.id,
                 after=audit.snapshot(gateway, GatewayPublic))
    commit(session, f"site {site.slug} already has a gateway named {data.name}")
    session.refresh(gateway)
    return GatewayEnrolled.model_validate(gateway, update={"token": token})


def rotate_gateway_token(session: Session, actor: Actor, gateway_id: uuid.UUID) -> GatewayEnrolled:
    """A new token for the gateway; the old one stops working at once."""
    gateway = get_or_404(session, Gateway, gateway_id, "gateway")
    token = new_token(GATEWAY_TOKEN_PREFIX)
    gateway.token_hash = hash_token(token)
    snapshot = audit.snapshot(gateway, GatewayPublic)
    audit.record(session, actor, "gateway.rotate_token", "gateway", gateway.id,
                 before=snapshot, after=snapshot | {"token_rotated": True})
    session.add(gateway)
    commit(session, "token collision; try again")
    session.refresh(gateway)
    return GatewayEnrolled.model_validate(gateway, update={"token": token})


def remove_gateway(session: Session, actor: Actor, gateway_id: uuid.UUID) -> None:
    gateway = get_or_404(session, Gateway, gateway_id, "gateway")
    audit.record(session, actor, "gateway.delete", "gateway", gateway.id,
                 before=audit.snapshot(gateway, GatewayPublic))
    session.delete(gateway)
    commit(session, "the gateway changed meanwhile; try again")
