"""The node firmware against a network as a site has it (issue 12): a WiFi that refuses the
password says so on the console, a gateway name that does not resolve (DNS blocks the board
for seconds) neither trips the watchdog nor stops the node from trying again, and a gateway
that does not answer (lwIP retries its SYN for 18 s) holds no connect past its deadline."""

import time

import pytest
from test_firmware import start_nodes, wait_until

from kinhbac.emulator.board import PWRON_RESET
from kinhbac.emulator.receiver import Receiver
from kinhbac.firmware import config_file, firmware_files


@pytest.fixture
def receiver():
    with Receiver({}) as rx:
        yield rx


def test_wrong_wifi_password_is_named_on_the_console_within_one_association_attempt(
        emulator, receiver):
    ap = emulator.access_point
    (node,) = start_nodes(emulator, receiver, wifi={"ssid": ap.ssid, "password": "not-it"})
    line = f"E kinhbac: WiFi: wrong password for SSID '{ap.ssid}'"
    started = time.monotonic()
    node.board.console.wait_for(line, timeout=15)
    assert time.monotonic() - started < 12  # an association attempt is 1-5 s
    time.sleep(20)  # about 1,000 polls of the status and one more attempt
    assert node.board.console.text().count(line) == 1  # said once, not at every poll
    assert node.board.boots == [PWRON_RESET]


def test_gateway_name_that_does_not_resolve_is_logged_and_retried_without_a_watchdog_reset(
        emulator, receiver):
    (node,) = start_nodes(emulator, receiver,
                          gateway={"host": "gateway.invalid", "port": receiver.port})
    line = "E kinhbac: gateway: 'gateway.invalid' does not resolve"
    node.board.console.wait_for(line, timeout=30)
    wait_until(lambda: node.board.console.text().count(line) >= 2, timeout=60,
               what="a second lookup")
    assert node.board.boots == [PWRON_RESET]  # each lookup held the board for seconds


def test_claim_mode_with_a_gateway_that_does_not_answer_is_never_reset_by_its_watchdog(
        emulator, receiver):
    board = emulator.add_board()
    ap = emulator.access_point
    ap.absent_hosts.add("127.0.0.1")  # SYNs go unanswered: lwIP gives up after 18 s
    config = {
        "claim_key": "k" * 32,
        "wifi": {"ssid": ap.ssid, "password": ap.password},
        "gateway": {"host": "127.0.0.1", "port": receiver.port},
        "console_window_ms": 100,
        "claim_retry_ms": 1000,
    }
    board.write_files(firmware_files() | config_file(config))
    board.power_on()
    board.console.wait_for("claim: no answer", timeout=30)  # the connect's own deadline
    time.sleep(30)  # the old firmware's open_connection waited out the SYN retries unfed
    assert board.boots == [PWRON_RESET]
    assert board.console.text().count("claim: no answer") >= 3
