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
