"""The console: each user's language, and console sessions (a login token with the CSRF token
of its forms).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

Existing users get no language (null): the console then follows the browser, Vietnamese first.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fleet_user") as batch:
        batch.add_column(sa.Column("locale", sa.String(length=8), nullable=True))
    op.create_table(
        "console_session",
        sa.Column("token_id", sa.Uuid(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["api_token.id"], ondelete="CASCADE",
                                name="fk_console_session_token_id_api_token"),
        sa.PrimaryKeyConstraint("token_id", name="pk_console_session"),
    )


def downgrade() -> None:
    op.drop_table("console_session")
    with op.batch_alter_table("fleet_user") as batch:
        batch.drop_column("locale")
