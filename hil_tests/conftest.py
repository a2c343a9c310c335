"""Hardware-in-the-loop tests: the same suite against a real board or an emulated one.

    pytest hil_tests --port /dev/ttyUSB0     # a real ESP32 running MicroPython
    pytest hil_tests                          # an emulated board (the default, in make test)

Everything goes through the serial raw REPL, so a test cannot tell the two apart.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kinhbac.transport.raw_repl import RawRepl
from kinhbac.transport.serial_link import connect


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--port",
        default=None,
        help="serial port of a real board (e.g. /dev/ttyUSB0); without it an emulated board",
    )


@dataclass
class Target:
    """The board under test, reached only through its serial port."""

    port: str
    emulated: bool
    reopen: Callable[[], RawRepl]

    def wait_after_reset(self, timeout: float = 15.0) -> RawRepl:
        """Reconnect once the board has rebooted (the port may vanish briefly on USB)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                repl = self.reopen()
                repl.enter_raw_repl()
                return repl
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Target]:
    port = request.config.getoption("--port")
    if port:
        yield Target(port, False, lambda: connect(port))
        return
    from kinhbac.emulator.site import Emulator

    with Emulator(tmp_path_factory.mktemp("hil")) as emu:
        board = emu.add_board()
        board.power_on()
        board.console.wait_for(">>> ", timeout=15)
        yield Target(board.tty_path, True, lambda: connect(board.tty_path))


@pytest.fixture
def repl(target: Target) -> Iterator[RawRepl]:
    session = target.reopen()
    session.enter_raw_repl()
    yield session
    if session.link.is_open:  # a test that resets the board closes the link itself
        session.exit_raw_repl()
        session.link.close()
