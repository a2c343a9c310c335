"""The site's network as an emulated board meets it: one WiFi access point, the DNS server its
DHCP hands out, and the hosts behind it.

Each figure is an ESP32's (MicroPython v1.24.1 on ESP-IDF v5.2.2 and its lwIP), with its source
in docs/emulator.md, "Emulated vs real ESP32". The emulator's board (board.py) plays the WiFi
driver; a board's stand-in `socket` asks this model how a name resolves (blocking as long as
lwIP would) and where a connection to an address goes. That is a loopback port standing for the
destination, one per board and destination, which the AP keeps in the state that makes the host
kernel treat the board's SYN as lwIP's would be treated:

- the destination answers: the port listens, and a relay carries each connection to the real
  destination; the AP cuts the relays when the board's link drops, as a real board's sockets die
  with its WiFi, and holds their traffic while the AP is gone but the board has not noticed;
- nobody answers (`absent_hosts`, a real address that does not answer, or the AP gone unnoticed):
  the port is a "black hole", a listener whose accept queue is full, so the kernel drops every
  SYN; the stand-in's sockets carry TCP_USER_TIMEOUT, so the connect fails after lwIP's SYN
  retries (18 s), not Linux's;
- the host is up with nothing on the port, or the board has no link: the port is bound and does
  not listen, so the SYN is refused at once.

The AP probes a destination (a real connect) when the board resolves it, and again every
half second while it refuses or does not answer; a connection a probe made waits for the board.
"""
import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kinhbac.emulator.board import Board

log = logging.getLogger(__name__)

RELAY_CHUNK = 16 * 1024

# lwIP's DNS client (esp-lwip for ESP-IDF v5.2.2, src/core/dns.c dns_check_entry): a query is
# sent DNS_MAX_RETRIES = 4 times per server, the timer ticks every DNS_TMR_INTERVAL = 1 s, and
# before each retry it waits as many ticks as retries so far. The first server's first tick
# comes at a random phase of that timer: the model takes the middle, 0.5 s.
DNS_TIMER_PHASE_S = 0.5
DNS_FIRST_SERVER_SENDS_S = (0.0, DNS_TIMER_PHASE_S, DNS_TIMER_PHASE_S + 1, DNS_TIMER_PHASE_S + 3)
DNS_FIRST_SERVER_GIVES_UP_S = DNS_TIMER_PHASE_S + 6
DNS_NEXT_SERVER_SENDS_S = (0.0, 1.0, 2.0, 4.0)  # a next server starts on a tick: whole seconds
DNS_NEXT_SERVER_GIVES_UP_S = 7.0
DNS_REPLY_S = 0.02  # one round trip to the site's DNS server (a LAN): an assumption, not measured
MDNS_QUERY_TIMEOUT_S = 5.0  # ports/esp32/modsocket.c:59 MDNS_QUERY_TIMEOUT_MS, for *.local names

# lwIP's SYN retries (esp-lwip src/core/tcp.c tcp_slowtmr, ESP-IDF components/lwip/Kconfig): in
# SYN_SENT the RTO stays at LWIP_TCP_RTO_TIME = 1500 ms (no backoff, tcp.c:1294), the slow timer
# ticks every 500 ms, and after TCP_SYNMAXRTX = 12 retransmissions the pcb is dropped: 12 x 1.5 s
# plus the last tick and the timer's phase, 18.0-18.5 s.
TCP_SYN_TIMEOUT_S = 18.25
# How long the AP waits for a real destination's answer before it takes the host for absent.
# Loopback answers in microseconds; a real address that does not answer is off, as far as a
# board on the site can tell.
REAL_CONNECT_WAIT_S = 1.0
PROBE_EVERY_S = 0.5  # a destination that refuses or does not answer is tried again this often
PARKED_S = 5.0  # a connection a probe made waits this long for the board's, no longer

# The states of a route's loopback port.
RELAY = "relay"
NO_ANSWER = "no answer"
REFUSED = "refused"


@dataclass(frozen=True)
class WifiTiming:
    """How long an ESP32's WiFi driver takes over each step, in seconds (docs/emulator.md)."""

    # WIFI_FAST_SCAN (the default) stops on the AP's channel; an active scan dwells 120 ms per
    # channel (ESP-IDF docs, api-guides/wifi.rst "scan_time"): an AP on channel 6, 0.72 s.
    scan_found_s: float = 0.72
    # All channels scanned without the AP: reason 201 about every 2.4 s in ESP32 logs
    # (micropython#4842, esp-idf#2359); 13 channels x 120 ms is the floor, 1.56 s.
    scan_missed_s: float = 2.4
    # Authentication, association and the 4-way handshake: 50 ms in micropython#4842's log.
    join_s: float = 0.05
    # DISCOVER to ACK, then lwIP's ARP check of the offered address, 500 ms (esp-lwip dhcp.c
    # dhcp_check; CONFIG_LWIP_DHCP_DOES_ARP_CHECK=y); the rest is the DHCP server's, assumed.
    dhcp_s: float = 1.73
    # A wrong password: the AP resends EAPOL 1/4 after 100 ms, then every 1 s, four times in
    # all (hostapd wpa_auth.c), then deauthenticates: reason 15, which ESP-IDF reports as 204.
    handshake_fail_s: float = 3.1
    # Beacons missed for this long and the station gives up the AP (esp_wifi.h,
    # esp_wifi_set_inactive_time: "Default 6s"); meanwhile it still thinks it is connected.
    beacon_timeout_s: float = 6.0

    @property
    def association_s(self) -> float:
        """connect() to isconnected(): scan, join, DHCP (2.5 s by default)."""
        return self.scan_found_s + self.join_s + self.dhcp_s

    @classmethod
    def quick(cls) -> "WifiTiming":
        """50 ms association and an AP loss noticed at once: for tests of other things."""
        return cls(scan_found_s=0.02, scan_missed_s=0.05, join_s=0.01, dhcp_s=0.02,
                   handshake_fail_s=0.05, beacon_timeout_s=0.0)


class AccessPoint:
    """One access point with one SSID and password, shared by the boards of a site.

    Tests change the world through its attributes: `wifi` (the driver's timing, overridden
    per board by `board.wifi_timing`), `hosts` (names the site's DNS answers), `dns_answers`
    (False: the DNS server is down), `dns_servers` (how many DHCP hands out), `absent_hosts`
    (addresses whose host is off) and `wrong_password_reasons`.
    """

    def __init__(self, ssid: str = "kinhbac-site", password: str = "kinhbac-pass", *,
                 wifi: WifiTiming | None = None) -> None:
        self.ssid = ssid
        self.password = password
        self.wifi = wifi or WifiTiming()
        self.hosts: dict[str, str] = {}
        self.dns_answers = True
        self.dns_servers = 1
        self.dns_reply_s = DNS_REPLY_S
        self.absent_hosts: set[str] = set()
        self.syn_timeout_s = TCP_SYN_TIMEOUT_S
        # The reasons a board's attempts end with when its password is wrong, in turn: the
        # failed handshake (204), then CONNECTION_FAIL (205) on the next try, as ESP32 logs
        # show (micropython#11625: 15 then 205; esp-idf#4698: 2 then 205); the port's
        # status() says STAT_WRONG_PASSWORD only for 202 and 205. (202,) is an AP that
        # refuses at authentication (micropython#4842).
        self.wrong_password_reasons: tuple[int, ...] = (204, 205)
        self._sleep = asyncio.sleep  # a test may count the DNS client's time instead
        self._up = True
        self._boards: set["Board"] = set()
        self._connections: dict["Board", set[asyncio.StreamWriter]] = {}
        self._clear: dict["Board", asyncio.Event] = {}
        self._routes: dict[tuple["Board", str, int], _Route] = {}
        self._prober: asyncio.Task | None = None

    @property
    def is_up(self) -> bool:
        return self._up

    def accepts(self, ssid: str, password: str) -> bool:
        return ssid == self.ssid and password == self.password

    def join(self, board: "Board") -> None:
        self._boards.add(board)

    async def set_up(self, up: bool) -> None:
        self._up = up
        for board in list(self._boards):
            await board.refresh_link()

    # ----- DNS -----

    async def resolve(self, board: "Board", name: str) -> str | None:
        """The address `name` resolves to for `board`, None when lwIP gives up (EAI_FAIL).

        Takes as long as the board would wait: one round trip for an answer (NXDOMAIN is an
        answer), lwIP's retries to every server when none answers."""
        if not board.dns_known:
            return None  # no DHCP lease since boot: lwIP has no server to ask (ERR_VAL at once)
        lower = name.lower()
        if lower.endswith(".local"):
            # The port asks mDNS first (modsocket.c mdns_getaddrinfo), then unicast DNS.
            if board.link_usable and lower in self._lower_hosts():
                await self._sleep(self.dns_reply_s)
                return self._lower_hosts()[lower]
            await self._sleep(MDNS_QUERY_TIMEOUT_S)
        for server in range(max(1, self.dns_servers)):
            first = server == 0
            sends = DNS_FIRST_SERVER_SENDS_S if first else DNS_NEXT_SERVER_SENDS_S
            gives_up = DNS_FIRST_SERVER_GIVES_UP_S if first else DNS_NEXT_SERVER_GIVES_UP_S
            waited = 0.0
            for at in sends:
                await self._sleep(at - waited)
                waited = at
                if board.link_usable and self.dns_answers:
                    await self._sleep(self.dns_reply_s)
                    return self._lower_hosts().get(lower)  # None: NXDOMAIN, an answer too
            await self._sleep(gives_up - waited)
        return None

    def _lower_hosts(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.hosts.items()}

    # ----- TCP -----

    async def route(self, board: "Board", address: str, port: int) -> int:
        """The loopback port standing for address:port for `board` (getaddrinfo asks)."""
        key = (board, address, port)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _Route(self, board, address, port)
        await route.refresh(probe=True)
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())
        return route.port

    async def refresh_routes(self, board: "Board") -> None:
        """The board's link changed: each of its ports takes the state that goes with it."""
        for key, route in list(self._routes.items()):
            if key[0] is board:
                await route.refresh(probe=route.state != RELAY)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            for route in list(self._routes.values()):
                try:
                    await route.refresh(probe=route.state != RELAY)
                except Exception:  # noqa: BLE001 (a route that cannot refresh waits for the next)
                    log.exception("refreshing the route to %s:%d", route.address,
                                  route.dest_port)

    async def _carry(self, board: "Board", board_reader: asyncio.StreamReader,
                     board_writer: asyncio.StreamWriter, dest_reader: asyncio.StreamReader,
                     dest_writer: asyncio.StreamWriter) -> None:
        if not board.link_up:
            _abort(board_writer)
            _abort(dest_writer)
            return
        conns = self._connections.setdefault(board, set())
        conns.update((board_writer, dest_writer))
        gate = self._gate(board)
        try:
            await asyncio.gather(_pipe(board_reader, dest_writer, gate),
                                 _pipe(dest_reader, board_writer, gate))
        finally:
            conns.discard(board_writer)
            conns.discard(dest_writer)
            _abort(board_writer)
            _abort(dest_writer)

    def _gate(self, board: "Board") -> asyncio.Event:
        gate = self._clear.get(board)
        if gate is None:
            gate = self._clear[board] = asyncio.Event()
            gate.set()
        return gate

    def hold(self, board: "Board", held: bool) -> None:
        """Stop (or restart) the traffic of `board`'s connections: its AP is gone, but its
        driver has not noticed yet, so its packets go nowhere and are sent again later."""
        gate = self._gate(board)
        if held:
            gate.clear()
        else:
            gate.set()

    def cut(self, board: "Board") -> None:
        """Drop every connection of `board`: its link went down."""
        self._gate(board).set()
        for writer in self._connections.pop(board, set()):
            _abort(writer)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        for board in list(self._connections):
            self.cut(board)
        for route in self._routes.values():
            route.close()
        self._routes.clear()


class _Route:
    """One board's way to one destination: a loopback port in the state that makes the host
    kernel answer the board's SYN as the site would (see the module's docstring)."""

    def __init__(self, ap: AccessPoint, board: "Board", address: str, port: int) -> None:
        self.ap = ap
        self.board = board
        self.address = address
        self.dest_port = port
        self.port = 0
        self.state = ""
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._fillers: list[socket.socket] = []
        self._parked: tuple[asyncio.StreamReader, asyncio.StreamWriter, float] | None = None
        self._probing = False

    async def refresh(self, probe: bool) -> None:
        """Take the state the board's link and the destination call for; with `probe`, find
        out whether the destination answers, by connecting to it."""
        board, ap = self.board, self.ap
        if self._parked is not None and asyncio.get_running_loop().time() - self._parked[2] > PARKED_S:
            self._drop_parked()
        if not board.link_up:
            await self._become(REFUSED)  # lwIP: no route (ERR_RTE), at once
        elif not board.link_usable or self.address in ap.absent_hosts:
            self._drop_parked()
            await self._become(NO_ANSWER)
        elif probe and not self._probing:
            self._probing = True
            try:
                await self._become(await self._probe())
            finally:
                self._probing = False

    async def _probe(self) -> str:
        if self._parked is not None:
            if asyncio.get_running_loop().time() - self._parked[2] < PARKED_S:
                return RELAY
            self._drop_parked()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.address, self.dest_port), REAL_CONNECT_WAIT_S)
        except ConnectionRefusedError:
            return REFUSED
        except (OSError, TimeoutError, ValueError) as exc:
            log.debug("%s: %s:%d does not answer (%s): a host that is off", self.board.name,
                      self.address, self.dest_port, exc)
            return NO_ANSWER
        self._parked = (reader, writer, asyncio.get_running_loop().time())
        return RELAY

    async def _become(self, state: str) -> None:
        if state == self.state:
            return
        self._close_port()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.state = state
        if state == RELAY:
            sock.listen(8)
            sock.setblocking(False)
            self._server = await asyncio.start_server(self._accepted, sock=sock)
        elif state == NO_ANSWER:
            # Backlog 1 takes two connections; with both queued and never accepted the queue is
            # full, and Linux drops each SYN that comes (tcp_conn_request): nobody answers.
            sock.listen(1)
            self._fillers = [socket.create_connection(("127.0.0.1", self.port), timeout=5)
                             for _ in range(2)]
            self._sock = sock
        else:
            self._sock = sock  # bound, not listening: a SYN is refused with RST

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        parked, self._parked = self._parked, None
        if parked is not None and loop.time() - parked[2] < PARKED_S:
            dest_reader, dest_writer = parked[0], parked[1]
        else:
            if parked is not None:
                _abort(parked[1])
            try:
                dest_reader, dest_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.address, self.dest_port), REAL_CONNECT_WAIT_S)
            except (OSError, TimeoutError, ValueError):
                # It went since the last probe: this connection is reset after it was made, the
                # next SYN is refused (or dropped) at once, as the site would.
                _abort(writer)
                await self.refresh(probe=True)
                return
        await self.ap._carry(self.board, reader, writer, dest_reader, dest_writer)

    def _drop_parked(self) -> None:
        if self._parked is not None:
            _abort(self._parked[1])
            self._parked = None

    def _close_port(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for sock in [*self._fillers, *([self._sock] if self._sock else [])]:
            sock.close()
        self._fillers = []
        self._sock = None

    def close(self) -> None:
        self._drop_parked()
        self._close_port()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                gate: asyncio.Event) -> None:
    try:
        while chunk := await reader.read(RELAY_CHUNK):
            await gate.wait()
            writer.write(chunk)
            await writer.drain()
        await gate.wait()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()
