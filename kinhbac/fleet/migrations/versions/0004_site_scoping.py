"""Site scoping for people: users and API tokens limited to a set of sites.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10

A user or token without rows here is not limited (city-wide), so existing users keep what they
had. Deleting a site someone is limited to is refused (RESTRICT): cascading would leave a user
limited to that one site with no limit at all.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _site_link(table: str, owner: str, owner_table: str) -> None:
    op.create_table(
        table,
        sa.Column(owner, sa.Uuid(), nullable=False),
        sa.Column("site_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            [owner], [f"{owner_table}.id"], name=op.f(f"fk_{table}_{owner}_{owner_table}"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"], ["site.id"], name=op.f(f"fk_{table}_site_id_site"), ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint(owner, "site_id", name=op.f(f"pk_{table}")),
    )
    op.create_index(op.f(f"ix_{table}_site_id"), table, ["site_id"])


def upgrade() -> None:
    _site_link("user_site", "user_id", "fleet_user")
    _site_link("api_token_site", "token_id", "api_token")


def downgrade() -> None:
    for table in ("api_token_site", "user_site"):
        op.drop_index(op.f(f"ix_{table}_site_id"), table_name=table)
        op.drop_table(table)
