"""Reading the audit log (admin only).

Never shown to a caller limited to sites (admins cannot be limited): an entry names a record by
id, not by site, and a device's entries stay with it when it moves, so the log cannot be cut
along sites without showing one site's history to another's technician.
"""

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import select

from kinhbac.fleet import audit
from kinhbac.fleet.deps import Admin, Limit, Offset, SessionDep
from kinhbac.fleet.models import AuditEntry, AuditEntryPublic, Page
from kinhbac.fleet.store import page

router = APIRouter(prefix="/api/audit", tags=["audit"])


@router.get("", response_model=Page[AuditEntryPublic])
def list_audit_entries(
    session: SessionDep,
    caller: Admin,
    entity: Annotated[str | None, Query(max_length=32)] = None,
    entity_id: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page:
    """Changes, newest first."""
    query = audit.filter_entries(select(AuditEntry), entity=entity, entity_id=entity_id,
                                 action=action)
    return page(session, query, AuditEntryPublic, order_by=audit.ORDER, limit=limit,
                offset=offset)
