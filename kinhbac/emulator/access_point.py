"""The site's WiFi access point: boards reach the network only through it.

Each board resolves a host through the AP (its stand-in `socket.getaddrinfo`), which answers with
the address of a relay listening on loopback. The relay carries the board's TCP connections to
the real destination, so when the AP goes down (or a board leaves its range) every connection
through it is cut at once, as a WiFi loss cuts a real board's sockets.
"""

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kinhbac.emulator.board import Board

log = logging.getLogger(__name__)

RELAY_CHUNK = 16 * 1024
ASSOCIATION_DELAY_S = 0.05  # a real station takes ~1-3 s to associate; tests want it quick


class LinkDown(OSError):
    """The board has no WiFi link: nothing can be resolved or connected."""


class AccessPoint:
    """One access point with one SSID and password, shared by the boards of a site."""

    def __init__(self, ssid: str = "kinhbac-site", password: str = "kinhbac-pass") -> None:
        self.ssid = ssid
        self.password = password
        self.association_delay = ASSOCIATION_DELAY_S
        self._up = True
        self._boards: set["Board"] = set()
        self._relays: dict[tuple["Board", str, int], asyncio.Server] = {}
        self._connections: dict["Board", set[asyncio.StreamWriter]] = {}

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

    async def route(self, board: "Board", host: str, port: int) -> int:
        """The loopback port of a relay from `board` to host:port, started on first use."""
        key = (board, host, port)
        server = self._relays.get(key)
        if server is None:
            server = await asyncio.start_server(
                lambda r, w: self._relay(board, host, port, r, w), "127.0.0.1", 0
            )
            self._relays[key] = server
        return server.sockets[0].getsockname()[1]

    def cut(self, board: "Board") -> None:
        """Drop every connection of `board`: its link went down."""
        for writer in self._connections.pop(board, set()):
            _abort(writer)

    async def close(self) -> None:
        for board in list(self._connections):
            self.cut(board)
        for server in self._relays.values():
            server.close()
        self._relays.clear()

    async def _relay(
        self,
        board: "Board",
        host: str,
        port: int,
        board_reader: asyncio.StreamReader,
        board_writer: asyncio.StreamWriter,
    ) -> None:
        if not board.link_up:
            _abort(board_writer)
            return
        try:
            dest_reader, dest_writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            log.debug("%s: relay to %s:%d refused: %s", board.name, host, port, exc)
            _abort(board_writer)  # the board sees its connection reset, as on a refused connect
            return
        conns = self._connections.setdefault(board, set())
        conns.update((board_writer, dest_writer))
        try:
            await asyncio.gather(
                _pipe(board_reader, dest_writer), _pipe(dest_reader, board_writer)
            )
        finally:
            conns.discard(board_writer)
            conns.discard(dest_writer)
            _abort(board_writer)
            _abort(dest_writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(RELAY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()
