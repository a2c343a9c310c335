# Stand-in for `socket` on an emulated board: the unix port's sockets, with name resolution
# and connections as lwIP on an ESP32 gives them, played by the emulator's access point
# (kinhbac/emulator/access_point.py):
# - getaddrinfo() takes a dotted IPv4 address as it is, as lwIP does without any network; a
#   name blocks the whole board while the site's DNS answers, or for lwIP's retries when it does
#   not (seconds), then raises OSError(-202), as the port does (ports/esp32/modsocket.c).
#   The address it gives is a loopback port standing for the destination, which the AP keeps
#   in the state the destination is in: relayed, dropping SYNs (nobody answers), or refusing.
# - socket() is the unix port's own object (a Python subclass would not poll right), with
#   TCP_USER_TIMEOUT set so that a SYN nobody answers fails after lwIP's retries.
# The ESP32 port's names only (ports/esp32/modsocket.c), not all of the unix port's; the
# option values stay the host's, since the host's sockets take them.
from usocket import (  # noqa: F401
    AF_INET, AF_INET6, SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOL_SOCKET, SO_REUSEADDR,
    SO_BROADCAST, IP_ADD_MEMBERSHIP)
import struct
import usocket
import _hw

# Few names here: every new one takes the board's heap (qstrs), which the port's C code does not.
_EAI_FAIL = -202  # lwip_getaddrinfo: any failed lookup; the port raises OSError(-EAI_FAIL)
_syn = [18250]  # ms: lwIP's SYN retries (access_point.py TCP_SYN_TIMEOUT_S), as last told

IPPROTO_IP = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_NODELAY = 1


def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    if not host:
        host = "0.0.0.0"  # the port's "" (modsocket.c _getaddrinfo_inner)
    address = host
    if not host.replace(".", "").isdigit():  # not a dotted address, which lwIP reads itself
        reply = _hw.call(_hw.OP_RESOLVE, 0, host.encode())  # blocks, as lwIP's lookup does
        if reply[0]:
            raise OSError(_EAI_FAIL)
        address = str(bytes(reply[1:]), "ascii")
    # The loopback port standing for address:port, and lwIP's SYN time in ms.
    port, _syn[0] = struct.unpack_from("<HH", _hw.call(_hw.OP_ROUTE, int(port), address.encode()))
    addr = bytes((2, 0, port >> 8, port & 255, 127, 0, 0, 1)) + bytes(8)  # sockaddr_in
    return [(AF_INET, type or SOCK_STREAM, proto, host, addr)]


class socket(usocket.socket):  # for the port's names; what it makes is a unix port socket
    def __new__(cls, af=AF_INET, type=SOCK_STREAM, proto=0):
        s = usocket.socket(af, type, proto)
        if type == SOCK_STREAM:
            s.setsockopt(IPPROTO_TCP, 18, _syn[0])  # TCP_USER_TIMEOUT (Linux)
        return s

    def __init__(self, af=AF_INET, type=SOCK_STREAM, proto=0):
        pass  # __new__ made a unix port socket: this is never called
