"""The console's device list over a city-sized registry (bench/console_bench.py, 1,000,000
devices): a trigram index for its search, and its site and firmware filters indexed together
with the wire id it pages by.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

- Search: pg_trgm (a trusted extension since PostgreSQL 13: the database's owner may create
  it) and its GIN index over the text the search looks in (models.DEVICE_SEARCH_SQL), so that a
  search for any part of an id, wire id or MAC does not read every device. PostgreSQL only:
  SQLite reads the table, as before.
- (site_id, wire_id) and (firmware_version, wire_id) replace the indexes on site_id and on
  firmware_version: a page deep in a site's or a version's list ("Next page" after a wire id)
  is then read in order from where it starts, instead of sorting all the site's or version's
  devices past it. Everything the old indexes served, their first column still serves.

On a registry of a million devices the upgrade takes about a minute (the trigram index most).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# models.DEVICE_SEARCH_SQL as it is today (a migration keeps its own copy).
_EXPRESSION = "((wire_id || ' ') || replace(CAST(id AS VARCHAR), '-', ''))"


def upgrade() -> None:
    op.create_index("ix_device_site_id_wire_id", "device", ["site_id", "wire_id"])
    op.drop_index("ix_device_site_id", table_name="device")
    op.create_index("ix_device_firmware_version_wire_id", "device",
                    ["firmware_version", "wire_id"])
    op.drop_index("ix_device_firmware_version", table_name="device")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute(f"CREATE INDEX ix_device_search_text ON device USING gin "
                   f"({_EXPRESSION} gin_trgm_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_device_search_text")
    op.create_index("ix_device_firmware_version", "device", ["firmware_version"])
    op.drop_index("ix_device_firmware_version_wire_id", table_name="device")
    op.create_index("ix_device_site_id", "device", ["site_id"])
    op.drop_index("ix_device_site_id_wire_id", table_name="device")
