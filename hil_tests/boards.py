"""The boards under test, reached only through their serial ports, and the node firmware put on
them the way a technician's tool puts it (kinhbac.device.board_session: stop the app, copy the
files, write the config, reset). An emulated board and a real one differ here only in where
the port comes from and which rig drives them."""

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kinhbac import wire
from kinhbac.device.board_session import BoardSession
from kinhbac.device.errors import BoardError
from kinhbac.emulator.launcher import SENSOR_KIT
from kinhbac.firmware import CONFIG_PATH, firmware_files
from kinhbac.transport.raw_repl import RawRepl

from .rig import Rig

# The node's settings in this suite: readings often, sent at once, logs with the heap report
# (log level 3); a boot that lives 1 s is good: the suite interrupts boots on purpose (each
# install, each REPL test), and with the shipped 60 s a run of short tests ends in safe mode.
NODE_SETTINGS: dict[str, Any] = {"interval_ms": 500, "send_after_ms": 500, "log_level": 3,
                                 "good_after_ms": 1000}
# The emulated nodes' water-and-weather kit on every bench too (docs/hil.md, "Wiring a bench").
LEVEL_SCALE = next(s["scale"] for s in SENSOR_KIT if s["name"] == "level")  # metres per volt


@dataclass
class Identity:
    """A node's identity in this suite: "kb" + MAC, key id 1, a secret made for the session."""

    mac: bytes
    secret: bytes = field(default_factory=lambda: os.urandom(32))

    @property
    def key(self) -> wire.Key:
        return wire.Key(b"kb" + self.mac, 1, self.secret)

    @property
    def device(self) -> str:
        return wire.device_hex(self.key.device_id)


@dataclass
class BoardUnderTest:
    """One board: its name in reports, its port, its rig, and what the suite made of it."""

    name: str
    port: str
    emulated: bool
    rig: Rig
    emulated_board: Any = None  # kinhbac.emulator.board.Board: for failure reports only
    identity: Identity | None = None
    # The settings the node runs with, as installed by the suite; None once a session with
    # the board may have stopped it or changed its files.
    node_settings: str | None = None

    @contextmanager
    def repl(self) -> Iterator[RawRepl]:
        """A raw-REPL session at a quiet board: whatever ran (the node, with its watchdog
        armed) is stopped as the technician's tool stops it, by a reset caught in the node's
        console window. The board is left at its friendly REPL."""
        with self.tool() as tool:
            tool.stop_app(just_reset=False)
            yield tool.repl
            if tool.link.is_open and tool.repl.in_raw_repl:
                tool.repl.exit_raw_repl()

    @contextmanager
    def tool(self) -> Iterator[BoardSession]:
        """The technician's tool's session with the board."""
        self.node_settings = None
        with BoardSession(self.port) as session:
            yield session

    @contextmanager
    def after_reset(self, repl: RawRepl, *, reset: bool = True) -> Iterator[RawRepl]:
        """machine.reset() from `repl` (or, not `reset`, a reset the board is about to make by
        itself), then a raw-REPL session once the board is back; `repl`'s link is closed (a
        USB port may vanish for a moment while the board resets)."""
        self.node_settings = None
        if reset:
            repl.link.write(b"import machine\r\nmachine.reset()\x04")
        repl.link.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                tool = BoardSession(self.port)
            except BoardError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            break
        with tool:
            tool.stop_app()
            yield tool.repl
            if tool.link.is_open and tool.repl.in_raw_repl:
                tool.repl.exit_raw_repl()

    def read_mac(self) -> bytes:
        with self.tool() as tool:
            tool.stop_app(just_reset=False)
            return bytes.fromhex(tool.mac().replace(":", ""))

    def install_node(self, *, wifi: tuple[str, str], gateway: tuple[str, int],
                     **settings: Any) -> None:
        """The node firmware and its config (its identity, the WiFi, the gateway, the kit),
        then a reset into it. `settings` override NODE_SETTINGS."""
        assert self.identity is not None, "the session gives each board its identity first"
        config = {
            "device_id": self.identity.device,
            "key_id": 1,
            "secret": self.identity.secret.hex(),
            "wifi": {"ssid": wifi[0], "password": wifi[1]},
            "gateway": {"host": gateway[0], "port": gateway[1]},
            "sensors": SENSOR_KIT,
        } | NODE_SETTINGS | settings
        config_bytes = json.dumps(config, sort_keys=True).encode()
        files = firmware_files() | {CONFIG_PATH: config_bytes}
        with self.tool() as tool:
            # Reset first, caught in the node's console window: a node that runs has armed
            # its watchdog, which would reset the board in the middle of the copy.
            tool.stop_app(just_reset=False)
            # Only what differs from the board's copy (each file's SHA-256, computed there):
            # most tests install what the last one left.
            changed = {path: data for path, data in files.items()
                       if tool.sha256(path) != hashlib.sha256(data).hexdigest()}
            tool.put_files(changed)
            tool.reset()
        self.node_settings = json.dumps(settings, sort_keys=True)

    def console_lines(self, duration: float) -> list[str]:
        """What the board prints on its serial port for `duration` seconds."""
        with BoardSession(self.port) as session:
            return session.read_lines(duration)

