# Stand-in for `socket` on an emulated board: the built-in socket, except that names are
# resolved through the emulator's access point, which relays the connection (and cuts it when
# the WiFi link drops). Firmware must resolve with getaddrinfo, as it must on an ESP32 anyway.
# The ESP32 port's names only (ports/esp32/modsocket.c), not all of the unix port's; the
# option values stay the host's, since the host's sockets take them.
from usocket import (  # noqa: F401
    socket, AF_INET, AF_INET6, SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOL_SOCKET, SO_REUSEADDR,
    SO_BROADCAST, IP_ADD_MEMBERSHIP)
import struct
import usocket
import _hw

_EAI_FAIL = -202  # what lwIP's getaddrinfo raises on an ESP32 without a network

IPPROTO_IP = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_NODELAY = 1


def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    if not _hw.link_up:
        raise OSError(_EAI_FAIL)
    try:
        reply = _hw.call(_hw.OP_ROUTE, port, host.encode())
    except OSError:
        raise OSError(_EAI_FAIL)  # the link dropped a moment ago: the same failure

    relay_port = struct.unpack("<H", reply)[0]
    return usocket.getaddrinfo("127.0.0.1", relay_port, af, type, proto, flags)
