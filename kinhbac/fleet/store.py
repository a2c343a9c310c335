"""Small helpers the operations share: commit-or-conflict, fetch-or-404, one page of a query."""

import uuid
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, func, select
from sqlmodel.sql.expression import SelectOfScalar

from kinhbac.fleet.errors import Conflict, NotFound
from kinhbac.fleet.models import Page

M = TypeVar("M", bound=SQLModel)


def commit(session: Session, conflict: str) -> None:
    """Commit; a unique constraint hit by a concurrent writer becomes Conflict(`conflict`)."""
    try:
        session.commit()
    except sa.exc.IntegrityError as exc:
        session.rollback()
        raise Conflict(conflict) from exc


def get_or_404(session: Session, model: type[M], id: uuid.UUID, what: str, *,
               lock: bool = False) -> M:
    """`lock`: the row is read afresh and locked until the transaction ends (PostgreSQL;
    SQLite locks the whole database on the first write), for a change that depends on the
    state it reads: two admins deciding the same thing at once then decide one after the
    other, and the second sees the first's outcome."""
    record = (session.get(model, id, with_for_update=True, populate_existing=True) if lock
              else session.get(model, id))
    if record is None:
        raise NotFound(f"no {what} {id}")
    return record


def page(
    session: Session,
    query: SelectOfScalar[M],
    public: type[SQLModel],
    *,
    order_by: Any,
    limit: int,
    offset: int,
) -> Page[Any]:
    """One page of `query`'s rows as `public` models, with the total the filters match."""
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(*order_by).limit(limit).offset(offset)).all()
    return Page(
        items=[public.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )
