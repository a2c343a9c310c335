"""Device status: each sensor's failure counts, as a node's HELLO reports them by sensor.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Existing statuses get none (null): their nodes' next HELLO brings them, if their firmware
counts per sensor.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device_status") as batch:
        batch.add_column(sa.Column("sensor_failures", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_status") as batch:
        batch.drop_column("sensor_failures")
