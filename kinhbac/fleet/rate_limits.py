"""In-memory sliding-window limits, per key: the counting that the login limits
(kinhbac/fleet/login_limits.py) and the claim report limits share.

The limits are per fleet instance, in memory: behind several instances a caller gets each
instance's allowance.
"""

import threading
import time
from collections import OrderedDict, deque

MAX_TRACKED = 10_000  # keys remembered per window; the least recently counted are forgotten first
CLAIM_WINDOW_S = 60.0  # the claim limits are "per minute"


class TooManyAttempts(Exception):
    """Refused before any work is done; `retry_after` is in whole seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class SlidingWindow:
    """Event times per key within the last `window_s` seconds, for a bounded number of keys."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def wait_s(self, key: str, now: float) -> float:
        """0 if `key` may have another event now, else how long until its oldest leaves the
        window."""
        times = self._times.get(key)
        if times is None:
            return 0.0
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            del self._times[key]
            return 0.0
        return times[0] + self.window_s - now if len(times) >= self.limit else 0.0

    def add(self, key: str, now: float) -> None:
        times = self._times.pop(key, None) or deque(maxlen=self.limit)
        times.append(now)
        self._times[key] = times  # most recently counted last
        while len(self._times) > MAX_TRACKED:
            self._times.popitem(last=False)

    def forget(self, key: str) -> None:
        self._times.pop(key, None)


class ClaimLimiter:
    """Claims reported per gateway and per site within a minute.

    A claim key in the wrong hands, or a gateway gone wrong, would otherwise turn each CLAIM
    into a database write and an audit entry at whatever rate it can send them. A refused
    report is not counted: the gateway gets through again as soon as its oldest claim in the
    window is a minute old.
    """

    def __init__(self, *, per_gateway: int, per_site: int,
                 window_s: float = CLAIM_WINDOW_S) -> None:
        self._gateways = SlidingWindow(per_gateway, window_s)
        self._sites = SlidingWindow(per_site, window_s)
        self._lock = threading.Lock()

    def take(self, gateway: str, site: str) -> None:
        """Count one claim report of `gateway` at `site`; TooManyAttempts, naming the limit, when
        either has been reached."""
        now = time.monotonic()
        with self._lock:
            by_gateway = self._gateways.wait_s(gateway, now)
            by_site = self._sites.wait_s(site, now)
            if not by_gateway and not by_site:
                self._gateways.add(gateway, now)
                self._sites.add(site, now)
                return
        if by_gateway:
            raise TooManyAttempts(
                f"too many claims from this gateway: at most {self._gateways.limit} a minute "
                "(KINHBAC_CLAIMS_PER_GATEWAY_PER_MINUTE); report it again later",
                int(by_gateway) + 1)
        raise TooManyAttempts(
            f"too many claims at this gateway's site: at most {self._sites.limit} a minute "
            "from its gateways together (KINHBAC_CLAIMS_PER_SITE_PER_MINUTE); report it again "
            "later", int(by_site) + 1)
