"""Shared fixtures: emulated boards on the real micropython binary."""

import pytest

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
