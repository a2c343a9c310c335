"""Shared fixtures: emulated boards on the real micropython binary, a private broker and a
subscriber that collects what reaches it."""

import time

import pytest
from helpers.gateway import Collector

from kinhbac.broker import LocalBroker
from kinhbac.emulator.site import Emulator


@pytest.fixture
def emulator(tmp_path):
    """An emulator with no boards yet; every board is stopped when the test ends."""
    with Emulator(tmp_path / "site") as emu:
        yield emu


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran emulated boards shows what each board printed last: what a host
    tool saw can be partial (it discards input between sessions), the board's console is not."""
    outcome = yield
    report = outcome.get_result()
    emulator = getattr(item, "funcargs", {}).get("emulator")
    if report.failed and isinstance(emulator, Emulator):
        for board in emulator.boards:
            lost = f" ({board.lost_serial_bytes} bytes lost: no one read)" \
                if board.lost_serial_bytes else ""
            report.sections.append((f"board {board.name}'s console, last 3000 characters{lost}",
                                    board.console.text()[-3000:]))


@pytest.fixture
def board(emulator):
    """One emulated board, powered off, with a blank flash."""
    return emulator.add_board()


@pytest.fixture
def broker(tmp_path):
    """A private broker on a free port (Mosquitto, or amqtt where it is missing)."""
    with LocalBroker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def collector(broker):
    """A subscriber on everything the gateway publishes (kinhbac/#)."""
    c = Collector(broker.port)
    time.sleep(0.2)  # subscribed before the first publish
    yield c
    c.close()
    assert not c.outside_contract, f"not as kinhbac/mqtt_contract.py says: {c.outside_contract}"
