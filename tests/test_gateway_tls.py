"""The gateway's uplink as deployed: TLS to a real mosquitto, a site account, the shipped ACL.

The gateway runs as a process (`kinhbac gateway run`); a CPython node speaks the wire codec to
it, and a fleet subscriber (TLS and its own account, as in production) reads what the broker
delivers. A broker problem must never stop the gateway from acknowledging nodes.
"""

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from helpers.certs import make_tls_material
from helpers.gateway import GatewayProcess, read_downlink_frame

from kinhbac import wire
from kinhbac.broker import BrokerUnavailable, LocalBroker, TlsFiles

ACL_EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "acl.example"
# Accounts named in deploy/mosquitto/acl.example.
SITE_USERS = {"fleet": "fleet-pw", "gw-site-a": "site-a-pw", "gw-site-b": "site-b-pw"}
SENSORS = [("temperature", "C"), ("humidity", "%RH")]
WAIT_S = 15.0  # every wait below ends in well under a second when things work


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class FakeNode:
    """One node's side of the wire in CPython: HELLO, then READINGS, ACKs verified."""

    def __init__(self, boot: int = 1) -> None:
        self.secret = os.urandom(32)
        self.key = wire.Key(b"kb" + os.urandom(6), 1, self.secret)
        self.device = wire.device_hex(self.key.device_id)
        self.boot = boot
        self.guard = wire.DownlinkGuard(boot)
        self.next_seq = 1

    def write_key_file(self, path: Path) -> Path:
        row = {"device_id": self.device, "key_id": 1, "secret": self.secret.hex()}
        path.write_text(json.dumps({"devices": [row]}))
        return path

    def send(self, port: int, count: int) -> int:
        """HELLO and `count` readings on a new connection; returns the seq the gateway acked."""
        hello = wire.encode_hello(self.key, self.boot, self.guard.next_counter(), "0.1.0",
                                  wire.RESET_POWER_ON, [0, 0, 0], SENSORS)
        now = int(time.time() * 1000)
        readings = [(i % len(SENSORS), i, 20.0 + i) for i in range(count)]
        batch = wire.encode_readings(self.key, self.boot, self.guard.next_counter(), self.boot,
                                     self.next_seq, now, False, readings)
        self.next_seq += count
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(hello + batch)
            s.settimeout(WAIT_S)
            while True:
                message = self._read_frame(s)
                if message.type == wire.ACK and message.through_seq is not None:
                    return message.through_seq
                assert message.type == wire.ACK, f"gateway answered {message.type_name}"

    def _read_frame(self, s: socket.socket) -> wire.Message:
        return read_downlink_frame(s, self.key, self.guard)


class FleetSubscriber:
    """The fleet's view of the broker: TLS, the `fleet` account, everything under kinhbac/#."""

    def __init__(self, broker: LocalBroker, ca_file: Path) -> None:
        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=f"fleet-{time.monotonic_ns()}")
        self.client.username_pw_set("fleet", SITE_USERS["fleet"])
        self.client.tls_set(ca_certs=str(ca_file))
        self.client.on_connect = lambda c, *_: c.subscribe("kinhbac/#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        assert subscribed.wait(WAIT_S), "the fleet subscriber could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def under(self, prefix: str) -> list[tuple[str, dict]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.startswith(prefix)]

    def readings(self, topic: str) -> list[dict]:
        return [r for _, p in self.under(topic) for r in p["readings"]]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def broker(tmp_path, tls_material):
    """Mosquitto as deploy/mosquitto configures it: TLS only, site accounts, the shipped ACL."""
    tls = TlsFiles(ca_file=tls_material.ca_file, cert_file=tls_material.server_cert,
                   key_file=tls_material.server_key)
    try:
        b = LocalBroker(tmp_path / "broker", require_mosquitto=True, users=SITE_USERS,
                        acl_file=ACL_EXAMPLE, tls=tls)
    except BrokerUnavailable as exc:
        if os.environ.get("KINHBAC_REQUIRE_MOSQUITTO") == "0":
            pytest.skip(f"{exc} (KINHBAC_REQUIRE_MOSQUITTO=0)")
        raise
    with b:
        yield b


@pytest.fixture
def fleet(broker, tls_material):
    f = FleetSubscriber(broker, tls_material.ca_file)
    yield f
    f.close()


@pytest.fixture
def start_gateway(tmp_path, broker):
    """start_gateway(node, site=..., **mqtt): a running gateway that knows the node's key."""
    started: list[GatewayProcess] = []

    def start(node: FakeNode, *, site: str, **mqtt: Any) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path / f"gw-{len(started)}",
                                 key_file=node.write_key_file(tmp_path / "keys.json"),
                                 broker_port=broker.port, site=site, mqtt=mqtt)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()


def metric(gateway: GatewayProcess, name: str) -> float:
    return gateway.metrics().get(f"kinhbac_gateway_{name}", 0.0)


def test_gateway_publishes_over_tls_with_its_site_account(start_gateway, fleet, tls_material):
    node = FakeNode()
    gateway = start_gateway(node, site="site-a", tls=True, ca_file=tls_material.ca_file,
                            username="gw-site-a", password=SITE_USERS["gw-site-a"])
    assert node.send(gateway.port, 20) == 20
    telemetry = f"kinhbac/site-a/{node.device}/telemetry"
    wait_until(lambda: len(fleet.readings(telemetry)) >= 20, "20 readings at the fleet")
    assert [r["seq"] for r in fleet.readings(telemetry)] == list(range(1, 21))
    assert fleet.readings(telemetry)[1] | {"ts": 0} == {
        "seq": 2, "sensor": "humidity", "value": 21.0, "unit": "%RH", "ts": 0, "pre_sync": False}
    wait_until(lambda: fleet.under(f"kinhbac/site-a/{node.device}/status"), "device status")
    (_, online), *_ = fleet.under("kinhbac/site-a/gateway/gw1/status")
    assert online["state"] == "online"
    assert metric(gateway, "uplink_connected") == 1
    assert "connected to broker" in gateway.log()


@pytest.mark.parametrize(
    ("mqtt", "logged"),
    [
        ({"ca": "other", "password": SITE_USERS["gw-site-a"]}, "certificate verify failed"),
        ({"ca": "own", "password": "wrong"}, "not authorized"),
    ],
    ids=["untrusted-broker-certificate", "wrong-password"],
)
def test_gateway_that_cannot_log_in_says_why_and_keeps_acking_nodes(
        start_gateway, fleet, tls_material, mqtt, logged):
    node = FakeNode()
    ca_file = tls_material.other_ca_file if mqtt["ca"] == "other" else tls_material.ca_file
    gateway = start_gateway(node, site="site-a", tls=True, ca_file=ca_file,
                            username="gw-site-a", password=mqtt["password"])
    wait_until(lambda: logged in gateway.log().lower(), f"'{logged}' in the gateway's log")
    assert node.send(gateway.port, 10) == 10
    assert node.send(gateway.port, 10) == 20  # still acking after failed attempts
    wait_until(lambda: metric(gateway, "queue_depth") == 20, "20 readings queued")
    assert metric(gateway, "uplink_connected") == 0
    assert metric(gateway, "uplink_reconnects_total") == 0  # no broker session ever began
    assert gateway.proc is not None and gateway.proc.poll() is None
    assert fleet.under("kinhbac/site-a/") == []


def test_gateway_whose_account_does_not_match_its_site_keeps_its_readings_and_says_why(
        start_gateway, fleet, tls_material, broker):
    # Site B's gateway configured with site A's account: the broker accepts the login, and
    # with MQTT 3.1.1 would acknowledge every publish that the ACL then discards. The gateway's
    # write probe catches it: nothing is published, so nothing is deleted.
    node = FakeNode()
    gateway = start_gateway(node, site="site-b", tls=True, ca_file=tls_material.ca_file,
                            username="gw-site-a", password=SITE_USERS["gw-site-a"])
    assert node.send(gateway.port, 10) == 10
    wait_until(lambda: "check the broker's acl" in gateway.log().lower(), "the ACL diagnosis")
    wait_until(lambda: metric(gateway, "queue_depth") == 10, "10 readings kept")
    assert metric(gateway, "readings_published_total") == 0
    assert metric(gateway, "uplink_connected") == 0

    # Site B's own account reaches the fleet, after the discarded publishes were acknowledged.
    sentinel = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="gw-site-b-sentinel")
    sentinel.username_pw_set("gw-site-b", SITE_USERS["gw-site-b"])
    sentinel.tls_set(ca_certs=str(tls_material.ca_file))
    sentinel.connect(broker.host, broker.port)
    sentinel.loop_start()
    try:
        sentinel.publish("kinhbac/site-b/sentinel", b"{}", qos=1).wait_for_publish(WAIT_S)
    finally:
        sentinel.loop_stop()
        sentinel.disconnect()
    wait_until(lambda: fleet.under("kinhbac/site-b/sentinel"), "the sentinel at the fleet")
    assert [topic for topic, _ in fleet.under("kinhbac/site-b/")] == ["kinhbac/site-b/sentinel"]
