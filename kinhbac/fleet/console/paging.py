"""The console lists' page links: a keyset cursor of the last row's time and id, which the
pending, audit, release and rollout lists all page by (the device list pages by wire id)."""

import re
import uuid
from datetime import UTC, datetime

_CURSOR = re.compile(r"^(\d{1,20})_([0-9a-f]{32})$")


def time_cursor(at: datetime, row_id: uuid.UUID) -> str:
    """The link to the page after the row with this time and id: microseconds since the epoch
    and the id's hex. A naive time is UTC, as the database hands it back."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return f"{int(aware.timestamp() * 1_000_000)}_{row_id.hex}"


def parse_time_cursor(text: str) -> tuple[datetime, uuid.UUID] | None:
    """A time_cursor's time and id, or None if the link is damaged."""
    found = _CURSOR.match(text)
    if found is None:
        return None
    try:
        at = datetime.fromtimestamp(int(found.group(1)) / 1_000_000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return at, uuid.UUID(found.group(2))
