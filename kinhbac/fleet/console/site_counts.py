"""The overview's counts of devices by state, taken for every site at once and kept a short
while, so that the page everyone opens first does not count the whole city on each visit.

Counting a million devices joined to their statuses takes 1.3 s on the bench's machine
(bench/RESULTS.md); reading it back takes nothing. So the first visit after the counts are
older than KINHBAC_CONSOLE_COUNTS_MAX_AGE_S counts every site in one query, and the visits
until they are that old again read them. One count at a time: visits arriving while it runs
wait for it and take its result, so twenty operators opening the overview at once cost one
count, not twenty. Nothing is counted while no one looks.

What is kept is a row per site and nothing of any user: each visit picks the rows of the sites
its caller sees (overview.sites), as the live count did, and shows when they were taken.
"""

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from kinhbac.fleet.models import utcnow


@dataclass(frozen=True)
class Counts:
    """Every site's devices by state (sites without devices absent), as of `taken_at`."""

    taken_at: datetime
    by_site: Mapping[uuid.UUID, Mapping[str, int]]


class SiteCounts:
    """The last counts of every site, for `max_age_s` seconds (0: none are kept)."""

    def __init__(self, count: Callable[[Session, datetime], Mapping[uuid.UUID,
                                                                      Mapping[str, int]]],
                 *, max_age_s: float) -> None:
        self._count = count
        self._max_age_s = max_age_s
        self._lock = threading.Lock()  # held while counting: one count at a time
        self._kept: tuple[float, Counts] | None = None  # monotonic time taken, and the counts

    @property
    def max_age_s(self) -> float:
        return self._max_age_s

    def _fresh(self) -> Counts | None:
        kept = self._kept  # one read: another thread may replace it meanwhile
        if kept is not None and time.monotonic() - kept[0] < self._max_age_s:
            return kept[1]
        return None

    def get(self, session: Session) -> Counts:
        """The kept counts while they are young enough, else new ones counted with `session`
        (or those another visit counted while this one waited for it)."""
        counts = self._fresh()
        if counts is not None:
            return counts
        with self._lock:
            counts = self._fresh()
            if counts is None:
                started = time.monotonic()
                now = utcnow()
                counts = Counts(taken_at=now, by_site=self._count(session, now))
                # Their age counts from when the count began: a device online then may have
                # gone silent since.
                self._kept = (started, counts)
            return counts

    def clear(self) -> None:
        """Forget the counts: the next visit counts again."""
        self._kept = None
