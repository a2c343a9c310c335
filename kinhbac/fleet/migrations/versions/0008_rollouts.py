"""Rollouts: a release sent to a target in waves, each device's place and progress in one, and
every step it reported.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Self-contained: a migration must not change when the models do.
_TIME = sa.DateTime(timezone=True)
_STATE = sa.String(16)


def upgrade() -> None:
    op.create_table(
        "rollout",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("release_id", sa.Uuid(), nullable=False),
        sa.Column("target_kind", _STATE, nullable=False),
        sa.Column("target_value", sa.JSON(), nullable=False),
        sa.Column("waves", sa.JSON(), nullable=False),
        sa.Column("wave_started_at", sa.JSON(), nullable=False),
        sa.Column("success_threshold", sa.Integer(), nullable=False),
        sa.Column("failure_threshold", sa.Integer(), nullable=False),
        sa.Column("device_deadline_s", sa.Integer(), nullable=False),
        sa.Column("allow_downgrade", sa.Boolean(), nullable=False),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("paused_reason", sa.String(500), nullable=True),
        sa.Column("failures_accepted", sa.Integer(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("created_by", sa.String(320), nullable=False),
        sa.Column("created_by_id", sa.Uuid(), nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["release.id"],
                                name=op.f("fk_rollout_release_id_release"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout")),
    )
    op.create_index(op.f("ix_rollout_release_id"), "rollout", ["release_id"])
    op.create_index(op.f("ix_rollout_state"), "rollout", ["state"])
    op.create_table(
        "rollout_device",
        sa.Column("rollout_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("offered_at", _TIME, nullable=True),
        sa.Column("deadline_at", _TIME, nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollout.id"],
                                name=op.f("fk_rollout_device_rollout_id_rollout"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"],
                                name=op.f("fk_rollout_device_device_id_device"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_rollout_device")),
    )
    op.create_index(op.f("ix_rollout_device_device_id"), "rollout_device", ["device_id"])
    op.create_index("ix_rollout_device_rollout_id_wave_state", "rollout_device",
                    ["rollout_id", "wave", "state"])
    op.create_table(
        "rollout_event",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("from_state", _STATE, nullable=False),
        sa.Column("to_state", _STATE, nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("source", _STATE, nullable=False),
        sa.Column("ignored", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollout.id"],
                                name=op.f("fk_rollout_event_rollout_id_rollout"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"],
                                name=op.f("fk_rollout_event_device_id_device"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_event")),
    )
    op.create_index("ix_rollout_event_rollout_id_device_id_at", "rollout_event",
                    ["rollout_id", "device_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_rollout_event_rollout_id_device_id_at", table_name="rollout_event")
    op.drop_table("rollout_event")
    op.drop_index("ix_rollout_device_rollout_id_wave_state", table_name="rollout_device")
    op.drop_index(op.f("ix_rollout_device_device_id"), table_name="rollout_device")
    op.drop_table("rollout_device")
    op.drop_index(op.f("ix_rollout_state"), table_name="rollout")
    op.drop_index(op.f("ix_rollout_release_id"), table_name="rollout")
    op.drop_table("rollout")
