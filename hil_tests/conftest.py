"""Hardware-in-the-loop tests: one suite for emulated boards and for a rack of real ESP32 boards.

    make hil                                    # emulated boards, started here
    make hil PORT=/dev/ttyUSB0                  # a real ESP32 running MicroPython
    pytest hil_tests --port /dev/ttyUSB0 --port /dev/ttyUSB1 --bench bench.toml

Every test reaches its board through the serial raw REPL the technician's tools use, so it
cannot tell the two apart; what a bench does to a board (power, the access point, a voltage or
pulses on a pin) goes through the rig (rig.py), which skips a test, naming the control, where
the bench lacks it. docs/hil.md says how to wire a bench and read the report.
"""

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import bench as bench_file
from .boards import BoardUnderTest, Identity
from .host import HostSite, start_site, write_keys
from .report import ALL_BOARDS, HilReport
from .rig import BenchRig, EmulatedRig

EMULATED_BOARDS = 2  # enough for the two-board tests


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop (hil_tests)")
    group.addoption("--port", action="append", default=[],
                    help="serial port of a real board (e.g. /dev/ttyUSB0); repeat for several. "
                    "Without it: emulated boards")
    group.addoption("--bench", default=None,
                    help="the bench file (TOML, see hil_tests/bench.example.toml): WiFi, the "
                    "host's address, each board's wiring")
    group.addoption("--every-emulated-board", action="store_true",
                    help="run each one-board test on every emulated board, not only the first "
                    "(they are identical; the others serve the tests of several boards)")
    group.addoption("--emulated-boards", type=int, default=EMULATED_BOARDS,
                    help="how many emulated boards, without --port")
    group.addoption("--hil-report", default="hil-report",
                    help="folder for the per-board reports (JSON)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "node_settings(**settings): the node's settings for "
                            "this test (hil_tests/boards.py NODE_SETTINGS)")
    config.pluginmanager.register(HilReport(Path(config.getoption("--hil-report"))),
                                  "hil-report")


def board_names(config: pytest.Config) -> list[str]:
    ports = config.getoption("--port")
    if ports:
        return [Path(port).name for port in ports]
    return [f"board-{i}" for i in range(config.getoption("--emulated-boards"))]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test of one board runs on each real board under test, named by it. Emulated boards
    are identical, so on them it runs on the first only (the others are there for the tests
    of several boards), unless --every-emulated-board: twice the time would test nothing
    more."""
    if "board" in metafunc.fixturenames:
        config = metafunc.config
        names = board_names(config)
        if not config.getoption("--port") and not config.getoption("--every-emulated-board"):
            names = names[:1]
        metafunc.parametrize("board", names, indirect=True, ids=names)


def _report(config: pytest.Config) -> HilReport:
    return config.pluginmanager.get_plugin("hil-report")


@dataclass
class Lab:
    """The boards under test and, once a test needs it, the host's site they report to."""

    boards: dict[str, BoardUnderTest]
    bench: bench_file.Bench
    workdir: Path
    emulator: Any = None  # kinhbac.emulator.site.Emulator, for emulated boards
    _site: HostSite | None = None

    @property
    def wifi(self) -> tuple[str, str]:
        if self.emulator is not None:
            return self.emulator.access_point.ssid, self.emulator.access_point.password
        return self.bench.wifi_ssid or "", self.bench.wifi_password or ""

    def site(self) -> HostSite:
        if self._site is None:
            if self.emulator is None and not self.bench.runs_nodes:
                pytest.skip("the bench file gives no WiFi or gateway_host, so a board cannot "
                            "reach the host's gateway (docs/hil.md, \"The bench file\")")
            listen = "127.0.0.1" if self.emulator is not None else "0.0.0.0"
            self._site = start_site(self.workdir / "site", list(self.boards.values()),
                                    listen_host=listen)
        return self._site

    @property
    def gateway_address(self) -> tuple[str, int]:
        site = self.site()
        host = "127.0.0.1" if self.emulator is not None else self.bench.gateway_host
        return host or "", site.gateway.port

    def close(self) -> None:
        if self._site is not None:
            self._site.close()
        for board in self.boards.values():
            board.rig.close()
        if self.emulator is not None:
            self.emulator.close()


def _emulated_lab(count: int, workdir: Path, bench: bench_file.Bench) -> Lab:
    from kinhbac.emulator.devices import BME280, AnalogSource, PulseSource
    from kinhbac.emulator.launcher import LEVEL_PIN, PULSE_PIN
    from kinhbac.emulator.site import Emulator

    emulator = Emulator(workdir / "emulator")
    emulator.start()
    boards = {}
    for index in range(count):
        board = emulator.add_board(f"board-{index}")
        bme280, level, meter = BME280(0x76), AnalogSource(volts=1.0), PulseSource(PULSE_PIN)
        board.attach_i2c(bme280)
        board.attach_analog(LEVEL_PIN, level)
        board.attach_pulses(PULSE_PIN, meter)
        board.power_on()
        rig = EmulatedRig(board.name, board, emulator, bme280, level, meter)
        boards[board.name] = BoardUnderTest(board.name, board.tty_path, True, rig,
                                            emulated_board=board)
    for under_test in boards.values():
        under_test.emulated_board.console.wait_for(">>> ", timeout=30)
    return Lab(boards, bench, workdir, emulator=emulator)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Lab]:
    config = request.config
    path = config.getoption("--bench")
    try:
        bench = bench_file.load(Path(path)) if path else bench_file.Bench()
    except bench_file.BenchFileError as exc:
        raise pytest.UsageError(str(exc)) from exc
    workdir = tmp_path_factory.mktemp("hil")
    ports = config.getoption("--port")
    if ports:
        boards = {Path(p).name: BoardUnderTest(Path(p).name, p, False,
                                               BenchRig(Path(p).name, bench, bench.wiring(p)))
                  for p in ports}
        built = Lab(boards, bench, workdir)
    else:
        built = _emulated_lab(config.getoption("--emulated-boards"), workdir, bench)
    for board in built.boards.values():
        _report(config).board(board.name, "emulated" if board.emulated else board.port)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def board(request: pytest.FixtureRequest, lab: Lab) -> Iterator[BoardUnderTest]:
    """One board under test (each test of one board runs on every board)."""
    name = request.param
    request.node.hil_board = name
    under_test = lab.boards[name]
    yield under_test
    under_test.rig.close()


@pytest.fixture
def boards(request: pytest.FixtureRequest, lab: Lab) -> list[BoardUnderTest]:
    """Every board under test, for tests of several boards at once."""
    request.node.hil_board = ALL_BOARDS
    return list(lab.boards.values())


@pytest.fixture
def two_boards(boards: list[BoardUnderTest]) -> list[BoardUnderTest]:
    if len(boards) < 2:
        pytest.skip("needs two boards: give --port twice (or --emulated-boards 2)")
    return boards[:2]


@pytest.fixture
def measure(request: pytest.FixtureRequest, board: BoardUnderTest
            ) -> Callable[..., None]:
    """record(name, value, unit, note=""): a measurement of this board, for its report."""
    report = _report(request.config)

    def record(name: str, value: float | str, unit: str, note: str = "") -> None:
        report.record(board.name, name, value, unit, note)

    return record


@dataclass
class Node:
    """A board running the node firmware, reporting to the host's site."""

    board: BoardUnderTest
    lab: Lab

    @property
    def device(self) -> str:
        assert self.board.identity is not None
        return self.board.identity.device

    @property
    def site(self) -> HostSite:
        return self.lab.site()

    def readings(self) -> dict[tuple[int, int], dict]:
        collector = self.site.collector
        with collector.lock:
            return dict(collector.readings[self.device])

    def wait_readings(self, more: int = 1, timeout: float = 60.0, what: str = "") -> None:
        """Until `more` readings beyond those already in have reached the broker."""
        collector = self.site.collector
        want = collector.count(self.device) + more
        collector.wait_for(lambda: collector.count(self.device) >= want, timeout,
                           what or f"{more} more readings from {self.board.name}")

    def install(self, **settings: Any) -> None:
        self.board.install_node(wifi=self.lab.wifi, gateway=self.lab.gateway_address,
                                **settings)


def install_node(lab: Lab, board: BoardUnderTest, settings: dict[str, Any]) -> Node:
    if board.identity is None:
        board.identity = Identity(board.read_mac())
        site = lab.site()
        write_keys(site.key_file, list(lab.boards.values()))
        time.sleep(1.1)  # the gateway's key file is reloaded when its mtime changes
    node = Node(board, lab)
    if board.node_settings == json.dumps(settings, sort_keys=True):
        try:  # still running as the last test left it: no need to start it again
            node.wait_readings(1, timeout=5)
            return node
        except TimeoutError:
            pass
    node.install(**settings)
    return node


@pytest.fixture
def node(request: pytest.FixtureRequest, lab: Lab, board: BoardUnderTest) -> Node:
    """The board running the node firmware (settings from the test's node_settings mark),
    its readings reaching the host's broker."""
    marker = request.node.get_closest_marker("node_settings")
    installed = install_node(lab, board, dict(marker.kwargs) if marker else {})
    installed.wait_readings(3, timeout=90, what=f"{board.name}'s first readings")
    return installed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test shows what the host's gateway logged last and, on emulated boards, what
    each board printed last (a real board's console is its serial port, which the test reads)."""
    outcome = yield
    report = outcome.get_result()
    lab = getattr(item, "funcargs", {}).get("lab")
    if not (report.failed and isinstance(lab, Lab)):
        return
    if lab.emulator is not None:
        for board in lab.emulator.boards:
            report.sections.append((f"board {board.name}'s console, last 3000 characters",
                                    board.console.text()[-3000:]))
    if lab._site is not None:
        report.sections.append(("the host's gateway log, last 3000 characters",
                                lab._site.gateway.log()[-3000:]))
