"""The node firmware against a network as a site has it (issue 12): a WiFi that refuses the
password says so on the console, a gateway name that does not resolve (when no DNS server
answers, lwIP holds the whole board longer than the watchdog's 10 s) neither trips the watchdog
nor stops the node from trying again, a gateway that does not answer (lwIP retries its SYN for
18 s) holds no connect past its deadline, and a claim whose answer never comes is given up in
time."""

import contextlib
import socket
import threading
import time

import pytest
from test_firmware import assert_contiguous, start_nodes, wait_until

from kinhbac.emulator.access_point import WifiTiming
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
    assert node.board.boots == [PWRON_RESET]  # each lookup an NXDOMAIN answer: one round trip


def test_a_gateway_name_lookup_longer_than_the_watchdog_neither_resets_nor_stops_the_node(
        emulator, receiver):
    ap = emulator.access_point
    ap.wifi = WifiTiming.quick()  # association is not what this is about
    # DHCP hands out two DNS servers and neither answers: lwIP's getaddrinfo holds the whole
    # board for 6.5 s + 7 s, longer than the 10 s watchdog, which nothing can feed meanwhile.
    ap.dns_servers = 2
    ap.dns_answers = False
    (node,) = start_nodes(emulator, receiver, gateway={"host": "gw.site", "port": receiver.port})
    node.board.console.wait_for("E kinhbac: gateway: 'gw.site' does not resolve", timeout=60)
    assert node.board.boots == [PWRON_RESET]  # the lookup outlasted the watchdog's 10 s
    ap.hosts["gw.site"] = "127.0.0.1"
    ap.dns_answers = True  # the DNS server is back: the next lookup finds the gateway
    receiver.wait_for_count(50, node.device, timeout=60)
    readings = receiver.readings_of(node.device)
    assert_contiguous([r.seq for r in readings])  # nothing taken before was lost
    assert node.board.boots == [PWRON_RESET]


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


class SilentGateway:
    """A gateway that takes every connection and never says a word (a process hung)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                self.connections.append(self._server.accept()[0])

    def close(self) -> None:
        self._server.close()
        for conn in self.connections:
            conn.close()


def test_claim_mode_waiting_for_an_answer_that_never_comes_is_never_reset_by_its_watchdog(
        emulator):
    board = emulator.add_board()
    ap = emulator.access_point
    ap.wifi = WifiTiming.quick()
    gateway = SilentGateway()
    try:
        config = {
            "claim_key": "k" * 32,
            "wifi": {"ssid": ap.ssid, "password": ap.password},
            "gateway": {"host": "127.0.0.1", "port": gateway.port},
            "console_window_ms": 100,
            "claim_retry_ms": 1000,
            # Claim mode waits 5 s for the answer (claim.ANSWER_TIMEOUT_MS): 2.5 timeouts of a
            # 2 s watchdog, which the old claim mode did not feed meanwhile.
            "watchdog_ms": 2000,
        }
        board.write_files(firmware_files() | config_file(config))
        board.power_on()
        wait_until(lambda: board.console.text().count("claim: no answer") >= 2, timeout=40,
                   what="two claims unanswered")
        assert len(gateway.connections) >= 2
    finally:
        gateway.close()
    assert board.boots == [PWRON_RESET], board.console.text()[-2000:]
