"""Claim key rotation: a site keeps the key a rotation replaced until its overlap ends, and a
claim remembers which key it was made under.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10

Existing sites have never rotated (no previous key). Existing claims get no fingerprint: they
were made under the current key, and the first rotation pins them to it (kinhbac/fleet/sites.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Self-contained: a migration must not change when the models do.
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("site") as batch:
        batch.add_column(sa.Column("previous_claim_key_enc", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("previous_claim_key_expires_at", _TIME, nullable=True))
        batch.add_column(sa.Column("claim_key_rotated_at", _TIME, nullable=True))
    with op.batch_alter_table("device") as batch:
        batch.add_column(sa.Column("claim_key_fingerprint", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.drop_column("claim_key_fingerprint")
    with op.batch_alter_table("site") as batch:
        batch.drop_column("claim_key_rotated_at")
        batch.drop_column("previous_claim_key_expires_at")
        batch.drop_column("previous_claim_key_enc")
