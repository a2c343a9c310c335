"""The console's device search: a trigram index on PostgreSQL, so that a search for any part
of a device's id, wire id or MAC does not read every device (bench/console_bench.py).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

PostgreSQL only: pg_trgm (a trusted extension since PostgreSQL 13: the database's owner may
create it) and its GIN index over the text the search looks in (models.device_search_text).
SQLite gets nothing: its search reads the table, as before.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# models.DEVICE_SEARCH_SQL as it is today (a migration keeps its own copy).
_EXPRESSION = "((wire_id || ' ') || replace(CAST(id AS VARCHAR), '-', ''))"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.execute(f"CREATE INDEX ix_device_search_text ON device USING gin "
               f"({_EXPRESSION} gin_trgm_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS ix_device_search_text")
