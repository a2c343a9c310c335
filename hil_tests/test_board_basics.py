"""What every board must do for our tools: run code, keep files, come back after a reset."""

import pytest

from kinhbac.transport.raw_repl import RemoteError


@pytest.fixture
def repl(board):
    with board.repl() as session:
        yield session


def test_board_runs_code_sent_over_the_raw_repl(repl):
    assert repl.exec("print(sum(range(10)))").strip() == b"45"


def test_board_reports_its_mac_as_unique_id(repl):
    mac = repl.eval("__import__('machine').unique_id()")
    assert isinstance(mac, bytes) and len(mac) == 6


def test_errors_on_the_board_come_back_with_their_traceback(repl):
    with pytest.raises(RemoteError) as raised:
        repl.exec("raise ValueError('from the board')")
    assert "ValueError: from the board" in raised.value.traceback


def test_file_survives_a_machine_reset(board, repl):
    payload = bytes(range(256)) * 4
    repl.fs_put(payload, "/hil_probe.bin")
    with board.after_reset(repl) as fresh:
        assert fresh.fs_get("/hil_probe.bin") == payload
        # esp_restart() is ESP_RST_SW, which the ESP32 port reports as HARD_RESET.
        assert fresh.eval("__import__('machine').reset_cause()") == 2
        fresh.fs_remove("/hil_probe.bin")


def test_hashlib_sha256_is_available_for_frame_macs(repl):
    digest = repl.eval("__import__('hashlib').sha256(b'abc').digest()")
    assert digest.hex().startswith("ba7816bf")
