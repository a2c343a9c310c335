"""A device's last update steps, read by its console page (console/devices.py: its events over
every rollout, newest first, ten of them), indexed by device and event id.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06

The only index on rollout_event began with the rollout, so a device's page read every event of
the fleet (each rollout writes several a device: offered, downloading, ... confirmed) to find
the device's own. With (device_id, id) it reads its ten newest in order and stops.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_rollout_event_device_id_id", "rollout_event", ["device_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_rollout_event_device_id_id", table_name="rollout_event")
