"""Sites and their profiles."""

import uuid

from fastapi import APIRouter, status
from sqlmodel import select

from kinhbac.fleet import sites
from kinhbac.fleet.deps import (
    Admin,
    AnyUser,
    Limit,
    Offset,
    SecretBoxDep,
    SessionDep,
    SettingsDep,
    Staff,
    visible_only,
    visible_or_404,
)
from kinhbac.fleet.models import (
    ClaimKeyRotation,
    Page,
    Site,
    SiteCreate,
    SiteProfile,
    SitePublic,
    SiteUpdate,
)
from kinhbac.fleet.store import page

router = APIRouter(prefix="/api/sites", tags=["sites"])


@router.post("", response_model=SitePublic, status_code=status.HTTP_201_CREATED)
def create_site(data: SiteCreate, session: SessionDep, box: SecretBoxDep, caller: Admin) -> Site:
    """A site; the fleet makes its claim key (see its profile)."""
    return sites.create_site(session, box, caller.actor, data)


@router.get("", response_model=Page[SitePublic])
def list_sites(
    session: SessionDep,
    caller: AnyUser,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page:
    """The sites the caller sees: every site, or those it is limited to."""
    return page(session, visible_only(select(Site), caller, Site), SitePublic,
                order_by=(Site.slug,), limit=limit, offset=offset)


@router.get("/{site_id}", response_model=SitePublic)
def get_site(site_id: uuid.UUID, session: SessionDep, caller: AnyUser) -> Site:
    return visible_or_404(session, caller, Site, site_id, "site")


@router.patch("/{site_id}", response_model=SitePublic)
def update_site(
    site_id: uuid.UUID, data: SiteUpdate, session: SessionDep, box: SecretBoxDep, caller: Admin
) -> Site:
    return sites.update_site(session, box, caller.actor, site_id, data)


@router.get("/{site_id}/profile", response_model=SiteProfile)
def get_site_profile(
    site_id: uuid.UUID, session: SessionDep, box: SecretBoxDep, caller: Staff
) -> SiteProfile:
    """The site with its WiFi password and claim key: what a node is set up from. Each read is
    in the audit log (`site.profile_read`): after a laptop is lost, it says which sites' secrets
    it could hold."""
    site = visible_or_404(session, caller, Site, site_id, "site")
    return sites.read_profile(session, box, caller.actor, site)


@router.post("/{site_id}/claim-key/rotate", response_model=SitePublic)
def rotate_claim_key(
    site_id: uuid.UUID, session: SessionDep, box: SecretBoxDep, settings: SettingsDep,
    caller: Admin, data: ClaimKeyRotation | None = None,
) -> Site:
    """A new claim key for the site; claims under the old one are still taken for
    `overlap_hours` (default KINHBAC_CLAIM_KEY_OVERLAP_HOURS), then refused. The answer holds
    no key: staff fetch the profile again (docs/security.md, "When a claim key leaks")."""
    return sites.rotate_claim_key(session, box, caller.actor, site_id,
                                  data or ClaimKeyRotation(),
                                  default_overlap_hours=settings.claim_key_overlap_hours)
