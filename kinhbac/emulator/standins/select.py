# Stand-in for `select` on an emulated board: the unix port's poll, plus what the ESP32 port's
# poll does while it waits. There, poll_poll_internal() loops on MICROPY_EVENT_POLL_HOOK, which
# runs scheduled callbacks (pin handlers) as they come (extmod/modselect.c,
# ports/esp32/mpconfigport.h); the unix port blocks in poll(2) and runs them only when it
# returns, so an asyncio program would take its pin handlers up to a whole timeout late and
# lose the edges that overflow the queue meanwhile. Here each poll also watches the socket on
# which the board's interrupt thread signals a queued handler (_hw.wake_r); a wake-up returns
# to Python, where the handler runs, and the caller polls again (asyncio's loop does).
import uselect
import _hw
from uselect import POLLIN, POLLOUT, POLLERR, POLLHUP  # noqa: F401


class _Poll:
    def __init__(self):
        self._p = uselect.poll()
        self._wake = _hw.wake_r
        if self._wake is not None:
            self._p.register(self._wake, 0)

    def register(self, obj, eventmask=POLLIN | POLLOUT):
        self._p.register(obj, eventmask)

    def unregister(self, obj):
        self._p.unregister(obj)

    def modify(self, obj, eventmask):
        self._p.modify(obj, eventmask)

    def ipoll(self, timeout=-1, flags=0):
        p = self._p
        wake = self._wake
        if wake is None or flags:
            return p.ipoll(timeout, flags)
        # Wait for an object or a wake-up; the ready objects are then asked for again with
        # the wake socket muted, so the caller never sees it (level-triggered: they stay ready).
        # Iterating the C poll's own iterator allocates nothing.
        p.modify(wake, POLLIN)
        woke = False
        for obj, _ in p.ipoll(timeout):
            if obj is wake:
                woke = True
        if woke:
            _hw.drain_wake()
        p.modify(wake, 0)
        return p.ipoll(0)

    def poll(self, timeout=-1):
        return [(obj, ev) for obj, ev in self.ipoll(timeout)]


def poll():
    return _Poll()
