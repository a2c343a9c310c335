"""Liveness for load balancers and deploy scripts: anyone may call it."""

import sqlalchemy as sa
from fastapi import APIRouter

from kinhbac.fleet.deps import SessionDep

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health")
def health(session: SessionDep) -> dict[str, str]:
    """{"status": "ok"} once the database answers."""
    session.exec(sa.select(1))
    return {"status": "ok"}
