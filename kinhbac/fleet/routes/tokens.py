"""API tokens for scripts and tools (admin only); the token is shown once, when made."""

import uuid

from fastapi import APIRouter, Response, status
from sqlmodel import select

from kinhbac.fleet import accounts
from kinhbac.fleet.deps import Admin, Limit, Offset, SessionDep, SettingsDep
from kinhbac.fleet.models import ApiToken, ApiTokenCreate, ApiTokenIssued, ApiTokenPublic, Page
from kinhbac.fleet.store import page

router = APIRouter(prefix="/api/tokens", tags=["tokens"])


@router.post("", response_model=ApiTokenIssued, status_code=status.HTTP_201_CREATED)
def create_token(data: ApiTokenCreate, session: SessionDep, caller: Admin,
                 settings: SettingsDep) -> ApiTokenIssued:
    """A bearer token acting as the given user, with that user's role and sites, or fewer
    sites (`site_ids`, a subset of the user's); it expires after `expires_in_days` (default
    KINHBAC_API_TOKEN_DAYS, 90)."""
    return accounts.issue_api_token(session, caller.actor, data,
                                    default_days=settings.api_token_days)


@router.get("", response_model=Page[ApiTokenPublic])
def list_tokens(
    session: SessionDep,
    caller: Admin,
    user_id: uuid.UUID | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page:
    query = select(ApiToken)
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    return page(session, query, ApiTokenPublic, order_by=(ApiToken.created_at, ApiToken.id),
                limit=limit, offset=offset)


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: uuid.UUID, session: SessionDep, caller: Admin) -> Response:
    accounts.revoke_api_token(session, caller.actor, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
