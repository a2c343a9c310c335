"""What gateways fetch with their own token."""

from fastapi import APIRouter, Response

from kinhbac.fleet import provisioning
from kinhbac.fleet.deps import GatewayCaller, SecretBoxDep, SessionDep
from kinhbac.fleet.models import GatewayKeys

router = APIRouter(prefix="/api/gateway", tags=["gateway"])


@router.get("/keys", response_model=GatewayKeys)
def device_keys(
    response: Response, session: SessionDep, box: SecretBoxDep, gateway: GatewayCaller
) -> GatewayKeys:
    """The keys of the active devices at the calling gateway's site (the key file's format)."""
    response.headers["Cache-Control"] = "no-store"  # secrets: no proxy or cache keeps them
    return provisioning.gateway_keys(session, box, gateway)
