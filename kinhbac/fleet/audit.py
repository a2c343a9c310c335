"""The audit log: who changed what, when, and the record before and after.

Snapshots are taken through the public models, which hold no secrets; the scrub below is a
second guard, so that a field added to a public model by mistake still never reaches the log.
"""

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlmodel import Session, SQLModel, select
from sqlmodel.sql.expression import SelectOfScalar

from kinhbac.fleet.models import AuditEntry, utcnow

# A gateway reads its site's keys every minute: one entry an hour per gateway says that it
# does (and from when) without a row per refresh.
GATEWAY_KEY_READS_LOGGED_EVERY = timedelta(hours=1)

# How the log is read: newest first, and in one order when two entries share a moment.
ORDER = (AuditEntry.at.desc(), AuditEntry.id)

# Keys never written to the log, whatever model they come from.
SECRET_FIELDS = frozenset({
    "secret", "secret_enc", "password", "password_hash", "token", "token_hash",
    "access_token", "wifi_password", "wifi_password_enc", "claim_key", "claim_key_enc",
})


@dataclass(frozen=True)
class Actor:
    """Who made a change: a user, a gateway, or the command line."""

    kind: str
    label: str
    id: uuid.UUID | None = None


CLI = Actor("cli", "cli")


def snapshot(record: SQLModel, public: type[SQLModel]) -> dict[str, Any]:
    """`record` as the API shows it (`public` model), JSON-ready, secrets scrubbed."""
    return scrub(public.model_validate(record).model_dump(mode="json"))


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in SECRET_FIELDS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def record(
    session: Session,
    actor: Actor,
    action: str,
    entity: str,
    entity_id: uuid.UUID | str,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add an entry to the session: it commits with the change it describes, or not at all."""
    entry = AuditEntry(
        actor_kind=actor.kind,
        actor_id=actor.id,
        actor=actor.label,
        action=action,
        entity=entity,
        entity_id=str(entity_id),
        before=scrub(before),
        after=scrub(after),
    )
    session.add(entry)
    return entry


def record_secret_read(session: Session, actor: Actor, action: str, entity: str,
                       entity_id: uuid.UUID | str, *, every: timedelta | None = None) -> None:
    """Log that `actor` was handed a secret (a site profile, a key listing) and commit.
    With `every`, only if the same actor's last such entry for `entity_id` is older."""
    if every is not None:
        recent = session.exec(
            select(AuditEntry.id).where(
                AuditEntry.action == action, AuditEntry.entity_id == str(entity_id),
                AuditEntry.actor_id == actor.id, AuditEntry.at > utcnow() - every,
            ).limit(1)
        ).first()
        if recent is not None:
            return
    record(session, actor, action, entity, entity_id)
    session.commit()


def filter_entries(query: SelectOfScalar[AuditEntry], *, entity: str | None = None,
                   entity_id: str | None = None,
                   action: str | None = None) -> SelectOfScalar[AuditEntry]:
    """`query` narrowed by the log's filters; the API's list and the console's both ask this,
    so a filter means the same in each."""
    if entity is not None:
        query = query.where(AuditEntry.entity == entity)
    if entity_id is not None:
        query = query.where(AuditEntry.entity_id == entity_id)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    return query
