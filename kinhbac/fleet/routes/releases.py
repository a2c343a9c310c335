"""Releases (admins): upload one, list them, read one with its signed manifest.

Releases are city-wide: a caller limited to sites is never an admin, so it gets 403 here as on
every admin route. Gateways fetch releases with their own token (routes/gateway_api.py).
"""

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from kinhbac import release_manifest
from kinhbac.fleet import releases, uploads
from kinhbac.fleet.deps import (
    Admin,
    ArtifactsDep,
    Limit,
    Offset,
    ReleaseSignerDep,
    SessionDep,
)
from kinhbac.fleet.models import Page, ReleaseDetail, ReleaseKind, ReleasePublic

router = APIRouter(prefix="/api/releases", tags=["releases"])
PATH = router.prefix  # the upload's path: http_hygiene gives it its own body limit


async def received_upload(request: Request, caller: Admin,
                          store: ArtifactsDep) -> uploads.Upload:
    """The upload's fields and files, received to disk after the caller's role is checked."""
    await run_in_threadpool(store.purge_stale_incoming)  # what a crashed instance left
    try:
        return await uploads.receive(
            request, store, fields=releases.FIELDS, file_field=releases.FILE_FIELD,
            max_files=release_manifest.MAX_FILES, check_file=releases.check_part)
    except uploads.UploadRefused as exc:
        detail: object = str(exc)
        if exc.status == status.HTTP_422_UNPROCESSABLE_CONTENT:
            detail = [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]
        raise HTTPException(exc.status, detail=detail) from None


_UPLOAD_BODY = {
    "required": True,
    "description": "multipart/form-data: `kind` and `version` fields, then the files as "
    "`file` parts. An image: one part (its file name is not used). A bundle: one part per "
    "file, its file name the absolute board path (curl: "
    "`-F 'file=@app.mpy;filename=/lib/node/app.mpy'`).",
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["kind", "version", "file"],
        "properties": {
            "kind": {"type": "string", "enum": [kind.value for kind in ReleaseKind]},
            "version": {"type": "string", "maxLength": releases.MAX_VERSION,
                        "example": "0.2.0"},
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "maxItems": release_manifest.MAX_FILES},
        },
    }}},
}


@router.post(
    "", response_model=ReleaseDetail, status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        409: {"description": "this kind and version is released already"},
        413: {"description": "the upload is larger than KINHBAC_RELEASE_MAX_UPLOAD_BYTES"},
        415: {"description": "not sent as multipart/form-data"},
        422: {"description": "a field, a path or a file that cannot be released, by name (an "
              "image larger than the OTA slot, a path with '..', ...); nothing is kept"},
        503: {"description": "the fleet cannot sign: its signing key needs its operator"},
    },
)
def upload_release(
    session: SessionDep, caller: Admin, store: ArtifactsDep, signer: ReleaseSignerDep,
    upload: Annotated[uploads.Upload, Depends(received_upload)],
) -> ReleaseDetail:
    """Upload a release: its files are checked, kept, listed in a manifest that the fleet
    signs, and recorded (audited as `release.upload`)."""
    try:
        return releases.create_release(session, store, signer, caller.actor, upload)
    finally:
        upload.discard()  # whatever was not kept


def _version_key(version: str | None) -> str | None:
    return None if version is None else releases.version_key(version)


@router.get("", response_model=Page[ReleasePublic])
def list_releases(
    session: SessionDep,
    caller: Admin,
    kind: ReleaseKind | None = None,
    version: Annotated[str | None, Query(max_length=releases.MAX_VERSION, description="compared "
                                         "as a version: 1.0 finds 1.0.0"),
                       AfterValidator(_version_key)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[ReleasePublic]:
    """Releases, newest first."""
    return releases.list_releases(session, kind=kind, version_key=version, limit=limit,
                                  offset=offset)


@router.get("/{release_id}", response_model=ReleaseDetail)
def get_release(release_id: uuid.UUID, session: SessionDep, caller: Admin) -> ReleaseDetail:
    """A release with its files, its canonical manifest and the manifest's signature."""
    return releases.detail(releases.get_release(session, release_id))
