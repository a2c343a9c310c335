"""What gateways fetch with their own token."""

from fastapi import APIRouter, Response

from kinhbac.fleet import provisioning
from kinhbac.fleet.deps import GatewayCaller, Principal, SecretBoxDep, SessionDep, SettingsDep
from kinhbac.fleet.models import ClaimAnswer, ClaimCreate, GatewayKeys

router = APIRouter(prefix="/api/gateway", tags=["gateway"])


@router.get("/keys", response_model=GatewayKeys)
def device_keys(
    response: Response, session: SessionDep, box: SecretBoxDep, gateway: GatewayCaller
) -> GatewayKeys:
    """The keys of the active devices at the calling gateway's site (the key file's format)."""
    response.headers["Cache-Control"] = "no-store"  # secrets: no proxy or cache keeps them
    return provisioning.gateway_keys(session, box, gateway)


@router.post("/claims", response_model=ClaimAnswer)
def report_claim(
    claim: ClaimCreate, session: SessionDep, gateway: GatewayCaller, settings: SettingsDep
) -> ClaimAnswer:
    """A node's CLAIM, verified by the calling gateway with its site's claim key: recorded as
    pending (admins approve or reject it) and answered with where it stands."""
    return provisioning.record_claim(session, gateway, Principal(gateway=gateway).actor, claim,
                                     max_pending=settings.max_pending_claims_per_site)
