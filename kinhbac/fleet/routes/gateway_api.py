"""What gateways fetch with their own token."""

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from fastapi.responses import FileResponse

from kinhbac import release_manifest
from kinhbac.fleet import audit, provisioning, releases, rollouts
from kinhbac.fleet.deps import (
    ArtifactsDep,
    GatewayCaller,
    Principal,
    SecretBoxDep,
    SessionDep,
    SettingsDep,
)
from kinhbac.fleet.errors import NotFound, Unavailable
from kinhbac.fleet.models import (
    ClaimAnswer,
    ClaimCreate,
    GatewayKeys,
    OtaAssignments,
    SignedManifest,
)
from kinhbac.fleet.rate_limits import ClaimLimiter, TooManyAttempts

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/gateway", tags=["gateway"])


# Without a previous claim key the listing has the shape it had before rotation existed.
@router.get("/keys", response_model=GatewayKeys, response_model_exclude_none=True)
def device_keys(
    response: Response, session: SessionDep, box: SecretBoxDep, gateway: GatewayCaller
) -> GatewayKeys:
    """The keys of the active devices at the calling gateway's site (the key file's format),
    its claim key, during a rotation's overlap the key it replaced, with its expiry, and the
    key that release manifests are signed with."""
    response.headers["Cache-Control"] = "no-store"  # secrets: no proxy or cache keeps them
    keys = provisioning.gateway_keys(session, box, gateway)
    keys.release_public_key = releases.public_key(session)
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


# Any enrolled gateway may fetch any release by id: firmware holds no secret (a node's identity
# is its own config), and which releases a site runs is the rollouts' business.
@router.get("/releases/{release_id}", response_model=SignedManifest)
def release_manifest_for_gateway(release_id: uuid.UUID, session: SessionDep,
                                 gateway: GatewayCaller) -> SignedManifest:
    """A release's canonical manifest and signature: verify the signature with the listing's
    release_public_key before trusting anything the manifest says."""
    release = releases.get_release(session, release_id)
    return SignedManifest(id=release.id, kind=release.kind, version=release.version,
                          manifest=release.manifest.decode("utf-8"),
                          signature=release_manifest.b64(release.signature))


@router.get("/releases/{release_id}/files/{index}", response_class=FileResponse, responses={
    200: {"content": {"application/octet-stream": {}},
          "description": "the file's bytes; Range requests resume a cut download"}})
def release_file_for_gateway(
    release_id: uuid.UUID,
    index: Annotated[int, Path(ge=0, lt=release_manifest.MAX_FILES,
                               description="the file's position in the manifest")],
    session: SessionDep, store: ArtifactsDep, gateway: GatewayCaller,
) -> FileResponse:
    """A release file's bytes: check them against the manifest's SHA-256 before use."""
    release = releases.get_release(session, release_id)
    if index >= len(release.file_rows):
        raise NotFound(f"release {release_id} has no file {index} (it has "
                       f"{len(release.file_rows)})")
    row = release.file_rows[index]
    if not store.has(row.sha256):
        log.error("release %s file %d (%s) is missing from %s", release_id, index, row.sha256,
                  store.root)
        raise Unavailable(f"the fleet's copy of release {release_id} file {index} is missing: "
                          "tell the fleet's operator")
    return FileResponse(store.local_path(row.sha256), media_type="application/octet-stream",
                        filename=row.path.rsplit("/", 1)[-1])


@router.get("/ota", response_model=OtaAssignments)
def ota_assignments(response: Response, session: SessionDep,
                    gateway: GatewayCaller) -> OtaAssignments:
    """What running rollouts offer the devices of the calling gateway's site now (wave started,
    not final, deadline not passed): fetch it with each key listing, offer what it lists and
    stop offering what it no longer does (docs/ota.md, "How the parts talk")."""
    response.headers["Cache-Control"] = "no-store"  # always the fleet's word of now
    return rollouts.assignments(session, gateway.site_id)
