"""What gateways fetch with their own token."""

from fastapi import APIRouter, HTTPException, Request, Response, status

from kinhbac.fleet import audit, provisioning
from kinhbac.fleet.deps import GatewayCaller, Principal, SecretBoxDep, SessionDep, SettingsDep
from kinhbac.fleet.models import ClaimAnswer, ClaimCreate, GatewayKeys
from kinhbac.fleet.rate_limits import ClaimLimiter, TooManyAttempts

router = APIRouter(prefix="/api/gateway", tags=["gateway"])


# Without a previous claim key the listing has the shape it had before rotation existed.
@router.get("/keys", response_model=GatewayKeys, response_model_exclude_none=True)
def device_keys(
    response: Response, session: SessionDep, box: SecretBoxDep, gateway: GatewayCaller
) -> GatewayKeys:
    """The keys of the active devices at the calling gateway's site (the key file's format),
    its claim key, and during a rotation's overlap the key it replaced, with its expiry."""
    response.headers["Cache-Control"] = "no-store"  # secrets: no proxy or cache keeps them
    keys = provisioning.gateway_keys(session, box, gateway)
    audit.record_secret_read(session, Principal(gateway=gateway).actor, "gateway.keys_read",
                             "site", gateway.site_id,
                             every=audit.GATEWAY_KEY_READS_LOGGED_EVERY)
    return keys


@router.post("/claims", response_model=ClaimAnswer, responses={
    429: {"description": "the gateway, or its site's gateways together, reported more claims "
          "within a minute than the limits allow: report it again after Retry-After seconds"}})
def report_claim(
    request: Request, claim: ClaimCreate, session: SessionDep, box: SecretBoxDep,
    gateway: GatewayCaller, settings: SettingsDep,
) -> ClaimAnswer:
    """A node's CLAIM, verified by the calling gateway with its site's claim key: recorded as
    pending (admins approve or reject it) and answered with where it stands. Limited per
    gateway and per site (docs/fleet.md, "Provisioning, third path")."""
    try:
        limiter: ClaimLimiter = request.app.state.claim_limiter
        limiter.take(str(gateway.id), str(gateway.site_id))
    except TooManyAttempts as exc:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=str(exc),
                            headers={"Retry-After": str(exc.retry_after)}) from None
    return provisioning.record_claim(session, gateway, Principal(gateway=gateway).actor, claim,
                                     box=box, max_pending=settings.max_pending_claims_per_site)
