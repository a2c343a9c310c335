"""Gateways enrolled at sites, and their tokens."""

import uuid

from fastapi import APIRouter, Response, status
from sqlmodel import select

from kinhbac.fleet import sites
from kinhbac.fleet.deps import (
    Admin,
    AnyUser,
    Limit,
    Offset,
    SessionDep,
    visible_only,
    visible_or_404,
)
from kinhbac.fleet.models import Gateway, GatewayCreate, GatewayEnrolled, GatewayPublic, Page
from kinhbac.fleet.store import page

router = APIRouter(prefix="/api/gateways", tags=["gateways"])


@router.post("", response_model=GatewayEnrolled, status_code=status.HTTP_201_CREATED)
def enrol_gateway(data: GatewayCreate, session: SessionDep, caller: Admin) -> GatewayEnrolled:
    """A gateway at a site, with its token: shown this once."""
    return sites.enrol_gateway(session, caller.actor, data)


@router.get("", response_model=Page[GatewayPublic])
def list_gateways(
    session: SessionDep,
    caller: AnyUser,
    site_id: uuid.UUID | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page:
    """The gateways at the sites the caller sees."""
    query = visible_only(select(Gateway), caller, Gateway)
    if site_id is not None:
        query = query.where(Gateway.site_id == site_id)
    return page(session, query, GatewayPublic, order_by=(Gateway.created_at, Gateway.id),
                limit=limit, offset=offset)


@router.get("/{gateway_id}", response_model=GatewayPublic)
def get_gateway(gateway_id: uuid.UUID, session: SessionDep, caller: AnyUser) -> Gateway:
    return visible_or_404(session, caller, Gateway, gateway_id, "gateway")


@router.post("/{gateway_id}/token", response_model=GatewayEnrolled)
def rotate_gateway_token(
    gateway_id: uuid.UUID, session: SessionDep, caller: Admin
) -> GatewayEnrolled:
    """A new token for the gateway (shown this once); the old one stops working at once."""
    return sites.rotate_gateway_token(session, caller.actor, gateway_id)


@router.delete("/{gateway_id}", status_code=status.HTTP_204_NO_CONTENT)
def remove_gateway(gateway_id: uuid.UUID, session: SessionDep, caller: Admin) -> Response:
    sites.remove_gateway(session, caller.actor, gateway_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
