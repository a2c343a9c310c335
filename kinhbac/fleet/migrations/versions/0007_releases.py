"""Releases: a kind and version, the canonical manifest and its signature, and the files.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-11

The files' bytes are not in the database: they are kept on disk by SHA-256
(kinhbac/fleet/artifacts.py), which release_file.sha256 names.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Self-contained: a migration must not change when the models do.
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "release",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("version_key", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("uploaded_by", sa.String(320), nullable=False),
        sa.Column("uploaded_by_id", sa.Uuid(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("signing_key", sa.String(44), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release")),
        sa.UniqueConstraint("kind", "version_key", name=op.f("uq_release_kind_version_key")),
    )
    op.create_table(
        "release_file",
        sa.Column("release_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("path", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["release.id"],
                                name=op.f("fk_release_file_release_id_release"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("release_id", "position", name=op.f("pk_release_file")),
        sa.UniqueConstraint("release_id", "path", name=op.f("uq_release_file_release_id_path")),
    )
    op.create_index(op.f("ix_release_file_sha256"), "release_file", ["sha256"])


def downgrade() -> None:
    op.drop_index(op.f("ix_release_file_sha256"), table_name="release_file")
    op.drop_table("release_file")
    op.drop_table("release")
