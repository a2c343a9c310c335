"""What the Sites pages show: the caller's sites, and one site with its profile (SitePublic),
its gateways and its devices by state.

The counts and gateways are the overview's own (overview.sites), so a site reads the same on
both pages; the site itself is found as the API finds it (visible_or_404), so another site's id
is "not found" like one that does not exist. The secrets (WiFi password, claim key) are not
here: they are opened only by a Reveal (kinhbac.fleet.sites.read_profile, audited).
"""

import uuid
from dataclasses import dataclass

from pydantic import ValidationError
from sqlmodel import Session

from kinhbac.fleet.console import overview
from kinhbac.fleet.console.site_counts import SiteCounts
from kinhbac.fleet.deps import Principal, visible_or_404
from kinhbac.fleet.errors import NotFound
from kinhbac.fleet.models import ClaimKeyRotation, Site, SitePublic

# The API's bound on the overlap, read from its model, for the form's field and its message.
OVERLAP_MAX_HOURS = next(
    constraint.le for constraint in ClaimKeyRotation.model_fields["overlap_hours"].metadata
    if hasattr(constraint, "le"))


@dataclass
class SiteView:
    site: SitePublic
    row: overview.SiteRow  # its counts by state and its gateways, as the overview shows them


def list_sites(session: Session, caller: Principal,
               kept: SiteCounts | None = None) -> list[overview.SiteRow]:
    """The caller's sites (the API's list: every site, or those it is limited to), by name,
    with the overview's counts (`kept`: its kept ones)."""
    return sorted(overview.sites(session, caller, kept=kept),
                  key=lambda row: row.name.casefold())


def parse_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def visible_site(session: Session, caller: Principal, site_id: str) -> Site:
    """The site of `site_id` if the caller sees it; NotFound (in the same words) for one at
    another site, one that does not exist and an address that is no id."""
    wanted = parse_id(site_id)
    if wanted is None:
        raise NotFound(f"no site {site_id}")
    return visible_or_404(session, caller, Site, wanted, "site")


def site_view(session: Session, caller: Principal, site: Site) -> SiteView:
    """The site as its page shows it (without secrets)."""
    rows = overview.sites(session, caller, site_id=site.id)
    return SiteView(site=SitePublic.model_validate(site),
                    row=rows[0] if rows else overview.SiteRow(site.id, site.name, site.slug))


def parse_rotation(overlap_hours: str) -> ClaimKeyRotation | None:
    """The rotation form's overlap, as POST /api/sites/{id}/claim-key/rotate takes it (an empty
    field: the fleet's default); None if it is not a number of hours the API would take."""
    try:
        return ClaimKeyRotation.model_validate({"overlap_hours": overlap_hours.strip() or None})
    except ValidationError:
        return None
