# The node's way onto the network: joining the site's WiFi, saying plainly why it cannot, and
# a TCP connection to the gateway, every step bounded in time. The ESP32 port's own calls are
# not: asyncio.open_connection resolves the name with a blocking getaddrinfo ("TODO this is
# blocking!", extmod/asyncio/stream.py) and its connect has no timeout, so an absent gateway
# holds a session for as long as lwIP retries its SYN. Here the address is resolved once and
# kept (a literal IP needs no DNS), with the watchdog given time for the lookup, and the connect
# is polled against a deadline.
import asyncio
import select
import socket
import time
import network
from errno import EINPROGRESS, ECONNRESET, ETIMEDOUT
from micropython import const

from node import log

WIFI_TIMEOUT_MS = const(15000)  # one association attempt (the driver retries inside it)
CONNECT_TIMEOUT_MS = const(5000)  # a gateway on the site's LAN answers a SYN within ms
# The watchdog's timeout while getaddrinfo runs: lwIP gives up on a name after 5-14 s
# (its DNS retries), and the event loop, hence the feeding task, is held all that time.
DNS_ALLOWANCE_MS = const(30000)
_REPEAT_MS = const(60000)  # a WiFi failure that lasts is logged again this often
_POLL_MS = const(20)

# network.WLAN.status() while the driver retries: the ESP-IDF's last disconnect reason
# (ports/esp32/network_wlan.c); any other 2xx code is logged by its number.
_WIFI_FAILURES = {
    200: "lost SSID %r (out of range, or its access point is down)",
    201: "no access point with SSID %r in range",
    202: "wrong password for SSID %r",
    203: "association with SSID %r failed",
    204: "handshake with SSID %r timed out (a wrong password?)",
}


class Wifi:
    """The station interface on the config's WiFi; logs why it cannot join, not every poll."""

    def __init__(self, wifi):
        self.wlan = network.WLAN(network.STA_IF)
        self.ssid = wifi["ssid"]
        self.password = wifi.get("password", "")
        self._failure = 0  # the status last logged as a failure, 0 while none
        self._logged = 0  # ticks_ms of that line

    async def up(self):
        """Join (or stay on) the WiFi; False after WIFI_TIMEOUT_MS without it."""
        wlan = self.wlan
        if wlan.isconnected():
            return True
        wlan.active(True)
        if wlan.status() != network.STAT_CONNECTING:
            wlan.connect(self.ssid, self.password)
        start = time.ticks_ms()
        while not wlan.isconnected():
            self._check(wlan.status())
            if time.ticks_diff(time.ticks_ms(), start) > WIFI_TIMEOUT_MS:
                wlan.disconnect()
                return False
            await asyncio.sleep_ms(_POLL_MS)
        if self._failure:
            self._failure = 0
            log.info("WiFi: joined SSID %r", self.ssid)
        log.info("wifi up: %s", wlan.ifconfig()[0])
        return True

    def _check(self, status):
        if not 200 <= status < 300:  # connecting, idle: no failure (yet)
            return
        now = time.ticks_ms()
        if status != self._failure or time.ticks_diff(now, self._logged) >= _REPEAT_MS:
            self._failure = status
            self._logged = now
            text = _WIFI_FAILURES.get(status)
            if text is None:
                log.error("WiFi: cannot join SSID %r (status %d)", self.ssid, status)
            else:
                log.error("WiFi: " + text, self.ssid)


class Gateway:
    """The gateway's address: resolved once, kept until a connection to it fails."""

    def __init__(self, gw):
        self.host = gw["host"]
        self.port = gw["port"]
        self._addr = None

    def address(self, wdt):
        """getaddrinfo's first entry for the gateway (OSError when it does not resolve).

        getaddrinfo blocks the whole board: instantly answered for a literal IP, up to about
        14 s for a name lwIP cannot resolve; `wdt` (None while the watchdog is off) is given
        DNS_ALLOWANCE_MS for it."""
        if self._addr is None:
            if wdt is not None:
                wdt.allow(DNS_ALLOWANCE_MS)
            try:
                self._addr = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
            except OSError as e:
                log.error("gateway: %r does not resolve (%s); trying again later",
                          self.host, e)
                raise
            finally:
                if wdt is not None:
                    wdt.restore()
        return self._addr

    def forget(self):
        """A connection failed: resolve the name again next time (its address may move)."""
        self._addr = None

    async def connect(self, wdt):
        """A stream to the gateway, connected within CONNECT_TIMEOUT_MS, or OSError."""
        addr = self.address(wdt)
        try:
            return await connect(addr, CONNECT_TIMEOUT_MS)
        except OSError:
            self.forget()
            raise

    def __str__(self):
        return "%s:%d" % (self.host, self.port)


async def connect(addr, timeout_ms):
    """A stream (reader and writer in one, as open_connection's) to a getaddrinfo entry."""
    s = socket.socket(addr[0], addr[1], addr[2])
    try:
        s.setblocking(False)
        try:
            s.connect(addr[-1])
        except OSError as e:
            if e.errno != EINPROGRESS:
                raise
        poller = select.poll()
        poller.register(s, select.POLLOUT)
        start = time.ticks_ms()
        while True:
            for entry in poller.ipoll(0):
                if entry[1] & (select.POLLERR | select.POLLHUP):
                    s.recv(1)  # raises the connection's own error (ECONNREFUSED, ...)
                    raise OSError(ECONNRESET)
                return asyncio.StreamReader(s)
            if time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
                raise OSError(ETIMEDOUT, "no connection within %d ms" % timeout_ms)
            await asyncio.sleep_ms(_POLL_MS)
    except BaseException:
        s.close()
        raise
