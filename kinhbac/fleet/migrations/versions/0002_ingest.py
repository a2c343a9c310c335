"""MQTT ingest: device statuses (known devices or not), gateway statuses, recent readings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Self-contained: a migration must not change when the models do.
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "device_status",
        sa.Column("wire_id", sa.String(16), nullable=False),
        sa.Column("site", sa.String(63), nullable=False),
        sa.Column("gateway", sa.String(63), nullable=False),
        sa.Column("last_seen_at", _TIME, nullable=False),
        sa.Column("offline_at", _TIME, nullable=False),
        sa.Column("firmware", sa.String(64), nullable=True),
        sa.Column("boot", sa.BigInteger(), nullable=True),
        sa.Column("reset_cause", sa.String(32), nullable=True),
        sa.Column("drops", sa.JSON(), nullable=False),
        sa.Column("sensors", sa.JSON(), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("wire_id", name=op.f("pk_device_status")),
    )

    op.create_table(
        "gateway_status",
        sa.Column("site", sa.String(63), nullable=False),
        sa.Column("gateway", sa.String(63), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since_at", _TIME, nullable=True),
        sa.Column("dropped", sa.JSON(), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("site", "gateway", name=op.f("pk_gateway_status")),
    )

    op.create_table(
        "recent_reading",
        sa.Column("boot", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sensor", sa.String(64), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("ts", _TIME, nullable=True),
        sa.Column("boot_ms", sa.BigInteger(), nullable=True),
        sa.Column("pre_sync", sa.Boolean(), nullable=False),
        sa.Column("wire_id", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("wire_id", "boot", "seq", name=op.f("pk_recent_reading")),
    )


def downgrade() -> None:
    for table in ("recent_reading", "gateway_status", "device_status"):
        op.drop_table(table)
