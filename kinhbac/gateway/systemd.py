"""systemd's notification protocol (sd_notify(3)): READY=1, STOPPING=1, STATUS=... and the
watchdog's WATCHDOG=1, each a line of one datagram to the Unix socket in $NOTIFY_SOCKET.

Written by hand: the protocol is a dozen lines, and systemd-python needs libsystemd's headers
to build on the Pi. Outside systemd ($NOTIFY_SOCKET unset) every call does nothing.
"""

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager; never raises (a lost notification is at
    worst a watchdog restart, which is what a gateway that cannot reach systemd deserves)."""

    def __init__(self, address: str | None, *, watchdog_s: float | None = None) -> None:
        """`address` as in $NOTIFY_SOCKET (a path, or '@' for the abstract namespace);
        `watchdog_s` the watchdog timeout (None: no watchdog)."""
        self._address: str | None = None
        self._shown = address
        if address and address[0] in "/@":
            self._address = "\0" + address[1:] if address[0] == "@" else address
        elif address:
            log.warning("NOTIFY_SOCKET=%s is not a Unix socket address: systemd will not hear "
                        "from the gateway", address)
        self.watchdog_s = watchdog_s if self._address is not None else None
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        """The notifier systemd asked for through the environment (sd_watchdog_enabled(3))."""
        watchdog_s = None
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        if usec:
            try:
                watchdog_s = int(usec) / 1_000_000 if int(usec) > 0 else None
                if pid and int(pid) != os.getpid():
                    watchdog_s = None  # the watchdog is another process's (we were forked)
            except ValueError:
                log.warning("WATCHDOG_USEC=%s WATCHDOG_PID=%s are not numbers: no watchdog "
                            "pings", usec, pid)
                watchdog_s = None
        return cls(environ.get("NOTIFY_SOCKET"), watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def ping_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_s is None else self.watchdog_s / 2

    def notify(self, *assignments: str) -> bool:
        """Send "READY=1", "STATUS=..." etc. in one datagram; True if it was sent."""
        if self._address is None:
            return False
        # A line break would start another assignment: a STATUS= text stays one line.
        message = "\n".join(" ".join(a.splitlines()) for a in assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)  # never holds up the event loop
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._failing:  # once per streak
                log.warning("cannot notify systemd at %s: %s", self._shown, exc)
                self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
