"""Claims (the nonce a device was approved with) and CONFIG settings for nodes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

The new device state `rejected` needs nothing here: states are stored as plain strings.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.add_column(sa.Column("claim_nonce", sa.String(32), nullable=True))
        batch.add_column(sa.Column("node_config", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.drop_column("node_config")
        batch.drop_column("claim_nonce")
