# The task watchdog: machine.WDT, which once started cannot be stopped. Whatever mode the node
# runs in (sampling, claiming, a deep-sleep cycle), a task feeds it while the event loop turns,
# and every step that holds the loop (a flash write, a sensor read) is far shorter than its
# timeout. The one step that can hold it longer, a DNS lookup (lwIP's getaddrinfo blocks for
# up to about 14 s when the name does not resolve), gets a longer timeout for its duration:
# a second WDT() call reconfigures the timeout (ports/esp32/machine_wdt.c).
import asyncio
import machine
from micropython import const

FEED_MS = const(250)  # how often the feeding task feeds: far inside any timeout


class Watchdog:
    def __init__(self, timeout_ms):
        self.timeout_ms = timeout_ms
        self._wdt = machine.WDT(timeout=timeout_ms)
        self._wide = False

    def feed(self):
        self._wdt.feed()

    def allow(self, ms):
        """Before one blocking call that may last up to `ms`: that long a timeout, fed."""
        if ms > self.timeout_ms:
            machine.WDT(timeout=ms)
            self._wide = True
        self._wdt.feed()

    def restore(self):
        """After it: the configured timeout again, fed."""
        if self._wide:
            machine.WDT(timeout=self.timeout_ms)
            self._wide = False
        self._wdt.feed()

    async def keep_fed(self):
        """Feed while the event loop turns (a loop held by a hang stops it)."""
        while True:
            self._wdt.feed()
            await asyncio.sleep_ms(FEED_MS)
