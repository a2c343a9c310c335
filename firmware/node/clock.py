# The node's clock: milliseconds since its boot began, from the CPU tick counter (which keeps
# counting across deep sleep only through RTC memory: see app.py), and the offset to Unix time
# learned from the gateway's ACKs. Readings carry boot-relative times; they become Unix times
# when they are sent, so a reading taken before the first sync still gets an exact time.
import time

STEP_MS = 500  # clock corrections below this are ACK delay, not drift (a crystal: ~4 s/day)


class Clock:
    def __init__(self, start_ms=0):
        self._ms = start_ms
        self._last = time.ticks_ms()
        self.offset = None  # Unix ms minus boot ms, once synced
        self.synced_at = None  # boot ms of the first sync in this boot

    def now(self):
        """Milliseconds since the boot began; never goes backwards."""
        t = time.ticks_ms()
        self._ms += time.ticks_diff(t, self._last)
        self._last = t
        return self._ms

    def sync(self, unix_ms):
        """Take the gateway's clock; returns True on the boot's first sync.

        After the first sync the offset moves only for a real step (STEP_MS): smaller
        differences are the ACK's network delay, and following them would make a boot's
        timestamps jitter and even go backwards.
        """
        now = self.now()
        offset = unix_ms - now
        if self.synced_at is None:
            self.offset = offset
            self.synced_at = now
            return True
        if abs(offset - self.offset) > STEP_MS:
            self.offset = offset
        return False

    @property
    def synced(self):
        return self.offset is not None
