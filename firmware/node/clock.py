# The node's clock: milliseconds since its boot began, from the CPU tick counter (which keeps
# counting across deep sleep only through RTC memory: see app.py), and the offset to Unix time
# learned from the gateway's ACKs. Readings carry boot-relative times; they become Unix times
# when they are sent, so a reading taken before the first sync still gets an exact time.
#
# The ESP32's RTC keeps its time across machine.reset(), watchdog resets and deep sleep, and
# starts at 2000-01-01 at power-on. The node sets it at every sync, so a boot that cannot
# reach the gateway (the reboots of a long outage) still knows the time from an earlier boot's
# sync: a year before MIN_YEAR means no boot since the power came on has synced it.
import time
import machine
from micropython import const

STEP_MS = 500  # clock corrections below this are ACK delay, not drift (a crystal: ~4 s/day)
MIN_YEAR = const(2024)  # an RTC date before this was never set since power-on
_EPOCH_S = 946684800 if time.gmtime(0)[0] == 2000 else 0  # gmtime's epoch in Unix seconds


def rtc_unix_ms():
    """Unix ms from the RTC, or None when it was not set since the power came on."""
    t = machine.RTC().datetime()  # year, month, day, weekday, hours, minutes, seconds, us
    if t[0] < MIN_YEAR:
        return None
    # Days since 1970-01-01 (H. Hinnant's days_from_civil): the ports' mktime differ in epoch
    # and, on the unix port, in time zone.
    y, m = t[0], t[1]
    if m <= 2:
        y -= 1
    yoe = y - y // 400 * 400
    days = (y // 400 * 146097 + yoe * 365 + yoe // 4 - yoe // 100
            + (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + t[2] - 1 - 719468)
    return (days * 86400 + t[4] * 3600 + t[5] * 60 + t[6]) * 1000 + t[7] // 1000


def set_rtc(unix_ms):
    """Set the RTC to `unix_ms` (UTC)."""
    t = time.gmtime(unix_ms // 1000 - _EPOCH_S)  # year, month, day, h, min, s, weekday, yday
    machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], unix_ms % 1000 * 1000))


class Clock:
    def __init__(self, start_ms=0):
        self._ms = start_ms
        self._last = time.ticks_ms()
        self.offset = None  # Unix ms minus boot ms, once synced
        self.synced_at = None  # boot ms of the first sync in this boot
        self.rtc_offset = None  # the same from the RTC, before any sync in this boot

    def now(self):
        """Milliseconds since the boot began; never goes backwards."""
        t = time.ticks_ms()
        self._ms += time.ticks_diff(t, self._last)
        self._last = t
        return self._ms

    def from_rtc(self):
        """Take the RTC's time as this boot's provisional offset; True if it had one."""
        unix_ms = rtc_unix_ms()
        if unix_ms is None:
            return False
        self.rtc_offset = unix_ms - self.now()
        return True

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

    def best_offset(self):
        """The gateway's offset if this boot synced, else the RTC's, else None."""
        return self.offset if self.offset is not None else self.rtc_offset
