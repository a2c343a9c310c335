"""Gateway statuses: how many readings the gateway's queue held and since when, as its
periodic status reports them, for the console's overview.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

Existing rows get none (null, shown as "not reported"): the gateway's next status brings them,
if it reports them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_status") as batch:
        batch.add_column(sa.Column("queue_depth", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("oldest_queued_at", sa.DateTime(timezone=True),
                                   nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gateway_status") as batch:
        batch.drop_column("oldest_queued_at")
        batch.drop_column("queue_depth")
