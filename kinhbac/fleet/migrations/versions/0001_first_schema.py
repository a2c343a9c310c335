"""First schema: users, API tokens, sites, gateways, devices and their tags, the audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Self-contained: a migration must not change when the models do.
_TIME = sa.DateTime(timezone=True)


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=16)


def upgrade() -> None:
    op.create_table(
        "fleet_user",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("full_name", sa.String(100), nullable=True),
        sa.Column("role", _enum("role", "admin", "technician", "viewer"), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet_user")),
    )
    op.create_index(op.f("ix_fleet_user_email"), "fleet_user", ["email"], unique=True)

    op.create_table(
        "api_token",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", _enum("tokenkind", "login", "api"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["fleet_user.id"], name=op.f("fk_api_token_user_id_fleet_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_token_token_hash")),
    )
    op.create_index(op.f("ix_api_token_user_id"), "api_token", ["user_id"])

    op.create_table(
        "site",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("wifi_ssid", sa.String(32), nullable=True),
        sa.Column("wifi_password_enc", sa.LargeBinary(), nullable=True),
        sa.Column("gateway_host", sa.String(253), nullable=True),
        sa.Column("gateway_port", sa.Integer(), nullable=True),
        sa.Column("sensor_kit", sa.JSON(), nullable=False),
        sa.Column("claim_key_enc", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_site")),
        sa.UniqueConstraint("slug", name=op.f("uq_site_slug")),
    )

    op.create_table(
        "gateway",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("site_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["site_id"], ["site.id"], name=op.f("fk_gateway_site_id_site"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gateway")),
        sa.UniqueConstraint("site_id", "name", name=op.f("uq_gateway_site_id_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_gateway_token_hash")),
    )
    op.create_index(op.f("ix_gateway_site_id"), "gateway", ["site_id"])

    op.create_table(
        "device",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("wire_id", sa.String(16), nullable=False),
        sa.Column("chip", sa.String(64), nullable=True),
        sa.Column("flash_size", sa.Integer(), nullable=True),
        sa.Column("board", sa.String(64), nullable=True),
        sa.Column("site_id", sa.Uuid(), nullable=True),
        sa.Column("firmware_version", sa.String(64), nullable=True),
        sa.Column("boot_counter", sa.BigInteger(), nullable=True),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("secret_enc", sa.LargeBinary(), nullable=True),
        sa.Column(
            "state", _enum("devicestate", "registered", "pending", "active", "revoked"),
            nullable=False,
        ),
        sa.Column("last_seen_at", _TIME, nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["site_id"], ["site.id"], name=op.f("fk_device_site_id_site"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device")),
        sa.UniqueConstraint("mac", name=op.f("uq_device_mac")),
        sa.UniqueConstraint("wire_id", name=op.f("uq_device_wire_id")),
    )
    op.create_index(op.f("ix_device_site_id"), "device", ["site_id"])
    op.create_index(op.f("ix_device_state"), "device", ["state"])
    op.create_index(op.f("ix_device_firmware_version"), "device", ["firmware_version"])

    op.create_table(
        "device_tag",
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["device.id"], name=op.f("fk_device_tag_device_id_device"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "tag", name=op.f("pk_device_tag")),
    )
    op.create_index(op.f("ix_device_tag_tag"), "device_tag", ["tag"])

    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("actor_kind", sa.String(16), nullable=False),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("actor", sa.String(320), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("entity", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_entry")),
    )
    op.create_index(op.f("ix_audit_entry_at"), "audit_entry", ["at"])
    op.create_index(op.f("ix_audit_entry_action"), "audit_entry", ["action"])
    op.create_index(op.f("ix_audit_entry_entity_id"), "audit_entry", ["entity_id"])


def downgrade() -> None:
    for table in ("audit_entry", "device_tag", "device", "gateway", "site", "api_token",
                  "fleet_user"):
        op.drop_table(table)
