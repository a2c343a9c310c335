"""Devices: the free flash each last reported (its HELLO, through its gateway's status) and
when, which a bundle's rollout is checked against.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Existing devices get none (null): their next HELLO brings it, if their firmware reports it;
until then a rollout does not refuse them (each node still refuses an offer too large for it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.add_column(sa.Column("free_flash_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("free_flash_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.drop_column("free_flash_at")
        batch.drop_column("free_flash_bytes")
