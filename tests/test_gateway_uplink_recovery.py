"""The gateway's uplink through broker faults: a stopped broker, a long outage, a broker that goes
silent, and the log of a run without any fault.

The real gateway process (`kinhbac gateway run`), CPython nodes speaking the wire codec, and a
private Mosquitto with persistence (the tests stop and restart it). The figures checked here are
the ones docs/mqtt.md ("Broker loss and recovery") states; every deadline below is that figure
plus generous slack for a busy machine, and none is a measurement.
"""

import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers.gateway import Collector, GatewayProcess, read_downlink_frame, read_exactly

from kinhbac import wire
from kinhbac.broker import LocalBroker
from kinhbac.gateway.config import MqttSettings

SENSORS = [("temperature", "C"), ("humidity", "%RH")]
BOOT = 1
# The gateway's real reconnect and keepalive settings, not the helper's quick test ones.
DEFAULT_BACKOFF = {name: MqttSettings.model_fields[name].default
                   for name in ("backoff_min_s", "backoff_max_s")}
CLIENT_ID = "kinhbac-testsite-gw1"  # the gateway's default MQTT client id in GatewayProcess
# docs/mqtt.md, "Broker loss and recovery": a broker that refused connections while it was down
# is tried again within backoff_max_s (default 5 s) of its return.
RECONNECT_BOUND_S = 5.0


def wait_until(condition: Callable[[], Any], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def uplink_connected(gateway: GatewayProcess) -> float:
    return gateway.metrics()["kinhbac_gateway_uplink_connected"]


class Node:
    """A CPython node on its own thread: one TCP connection, HELLO, then READINGS batches one at
    a time, each sent once the gateway acknowledged the one before. A lost connection or an
    ERROR frame starts over with HELLO and the unacknowledged batch, as the firmware does."""

    def __init__(self, batch: int = 10, pause_s: float = 0.05) -> None:
        self.secret = os.urandom(32)
        self.key = wire.Key(b"rc" + os.urandom(6), 1, self.secret)
        self.device = wire.device_hex(self.key.device_id)
        self.batch = batch
        self.pause_s = pause_s
        self.acked = 0  # readings 1..acked of BOOT are durable at the gateway
        self.guard = wire.DownlinkGuard(BOOT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def key_row(self) -> dict[str, Any]:
        return {"device_id": self.device, "key_id": 1, "secret": self.secret.hex()}

    def start(self, port: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(port,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _run(self, port: int) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.settimeout(20)
                    self._session(s)
            except (OSError, wire.FrameError, ConnectionError):
                self._stop.wait(0.2)

    def _session(self, s: socket.socket) -> None:
        s.sendall(wire.encode_hello(self.key, BOOT, self.guard.next_counter(), "0.1.0",
                                    wire.RESET_POWER_ON, [0, 0, 0], SENSORS))
        while not self._stop.is_set():
            first = self.acked + 1
            readings = [(i % len(SENSORS), i, 20.0 + (first + i) % 7) for i in range(self.batch)]
            s.sendall(wire.encode_readings(self.key, BOOT, self.guard.next_counter(), BOOT,
                                           first, int(time.time() * 1000), False, readings))
            last = first + self.batch - 1
            while self.acked < last:
                message = self._read_frame(s)
                if message.type == wire.ERROR_DOWN:
                    raise ConnectionError(f"gateway answered {message.reason_name}")
                if (message.type == wire.ACK and message.through_seq is not None
                        and message.readings_boot == BOOT):
                    self.acked = max(self.acked, message.through_seq)
            self._stop.wait(self.pause_s)

    def _read_frame(self, s: socket.socket) -> wire.Message:
        return read_downlink_frame(s, self.key, self.guard)


class SilentRelay:
    """A TCP relay in front of the broker that can go silent: it then keeps every connection
    open but passes nothing either way, not even the broker's close, as a hung broker host or a
    network path that black-holes packets does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _keep(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(s)
        return s

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            self._keep(client)
            if self.silent.is_set():
                threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
                continue
            try:
                upstream = self._keep(socket.create_connection(("127.0.0.1", self.target_port)))
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                if dst is not None and not self.silent.is_set():
                    dst.shutdown(socket.SHUT_WR)
                return
            if dst is not None and not self.silent.is_set():
                try:
                    dst.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        with self._lock:
            for s in self._sockets:
                s.close()


class RestartingBroker:
    """Holds the broker's port while the broker is down and answers every CONNECT with CONNACK
    return code 3, "server unavailable", as a broker still starting does; records who asked.

    The moment the gateway's attempt is refused is the worst moment for the broker to come
    back: the gateway then waits one whole reconnect delay before it tries again."""

    def __init__(self, port: int) -> None:
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.1)  # accept() does not wake up when the socket is closed
        self._closing = threading.Event()
        self.attempts: list[str] = []  # client ids, in order
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.settimeout(5)
                    self.attempts.append(self._client_id(conn))
                    conn.sendall(b"\x20\x02\x00\x03")  # CONNACK: server unavailable
                except OSError:
                    continue

    @staticmethod
    def _client_id(conn: socket.socket) -> str:
        """The client id of an MQTT 3.1.1 CONNECT packet."""

        def read(n: int) -> bytes:
            return read_exactly(conn, n)  # ConnectionError (an OSError) if it closes early

        read(1)  # packet type
        length, shift = 0, 0
        while True:
            byte = read(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = read(length)
        name_len = int.from_bytes(body[0:2], "big")
        at = 2 + name_len + 4  # protocol name, level, flags, keepalive
        id_len = int.from_bytes(body[at:at + 2], "big")
        return body[at + 2:at + 2 + id_len].decode()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture
def broker(tmp_path):
    """Persistent, so the collector's session (and what was published for it) survives a
    restart."""
    with LocalBroker(tmp_path / "broker", persistence=True) as b:
        yield b


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def start_gateway(tmp_path, nodes):
    """start_gateway(broker_port, n_nodes=0, **settings): a gateway whose key file holds the
    nodes it starts; the nodes send until the test ends."""
    gateways: list[GatewayProcess] = []

    def start(broker_port: int, n_nodes: int = 0, *, node_batch: int = 10,
              **settings: Any) -> GatewayProcess:
        own = [Node(batch=node_batch) for _ in range(n_nodes)]
        key_file = tmp_path / "keys.json"
        key_file.write_text(json.dumps({"devices": [n.key_row() for n in own]}))
        gateway = GatewayProcess(tmp_path / "gw", key_file=key_file, broker_port=broker_port,
                                 **settings)
        gateways.append(gateway)
        gateway.start()
        for node in own:
            node.start(gateway.port)
        nodes.extend(own)
        return gateway

    yield start
    for gateway in gateways:
        gateway.stop()


def warnings_and_errors(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line)]


def test_idle_gateway_notices_at_once_that_the_broker_stopped(broker, start_gateway):
    gateway = start_gateway(broker.port)  # no nodes: nothing is published that could fail
    wait_until(lambda: uplink_connected(gateway) == 1, "connected", 20)
    broker.stop()  # mosquitto closes the gateway's connection
    # The close is seen at once; 15 s is slack for a busy machine, not a figure.
    wait_until(lambda: uplink_connected(gateway) == 0, "uplink_connected 0 while idle", 15)
    wait_until(lambda: re.search(r" WARNING \S+: lost the broker 127\.0\.0\.1:\d+",
                                 gateway.log()), "a warning that the broker is lost", 5)


def test_idle_gateway_notices_a_silent_broker_within_the_keepalive_bound(broker,
                                                                       start_gateway):
    relay = SilentRelay(broker.port)
    try:
        keepalive_s = 5  # the smallest allowed, to keep the test short
        gateway = start_gateway(relay.port, mqtt={"keepalive_s": keepalive_s})
        wait_until(lambda: uplink_connected(gateway) == 1, "connected", 20)
        relay.silent.set()  # the TCP connection stays open; nothing comes back
        bound_s = 2 * keepalive_s + 2  # docs/mqtt.md, "Broker loss and recovery"
        wait_until(lambda: uplink_connected(gateway) == 0,
                   f"a silent broker noticed (stated bound {bound_s} s)", bound_s + 10)
        assert re.search(r" WARNING \S+: lost the broker .*keepalive", gateway.log()), (
            gateway.log())
    finally:
        relay.close()


def test_backlog_reaches_a_subscriber_within_seconds_of_the_broker_returning_from_a_long_outage(
        broker, start_gateway, nodes):
    collector = Collector(broker.port)
    try:
        gateway = start_gateway(broker.port, n_nodes=3, mqtt=DEFAULT_BACKOFF)
        wait_until(lambda: all(n.acked >= 50 for n in nodes) and collector.count() >= 150,
                   "readings flowing before the outage", 30)
        broker.stop()
        time.sleep(35)  # longer than the old 30 s cap: the backoff has grown to its cap
        # The broker comes back just after a refused attempt: the worst case, a whole delay.
        restarting = RestartingBroker(broker.port)
        try:
            wait_until(lambda: CLIENT_ID in restarting.attempts,
                       "a reconnect attempt by the gateway", 40)
        finally:
            restarting.close()
        broker.start()
        queued = {n.device: n.acked for n in nodes}  # acknowledged, so durable and queued
        assert gateway.metrics()["kinhbac_gateway_queue_depth"] > 0

        def delivered() -> bool:
            with collector.lock:
                return all(set(range(1, queued[n.device] + 1))
                           <= {s for b, s in collector.readings[n.device] if b == BOOT}
                           for n in nodes)

        # docs/mqtt.md: the next attempt within backoff_max_s (5 s) of the broker's return;
        # 7 s more for a busy machine. The old 30 s cap waited at least 15 s here.
        wait_until(delivered, "the backlog at the subscriber", RECONNECT_BOUND_S + 7)
        assert re.search(r" INFO \S+: reconnected to broker .* after \d+ s", gateway.log())
    finally:
        collector.close()


def test_a_fault_free_run_with_nodes_sending_logs_no_warning_or_error(broker, start_gateway,
                                                                      nodes):
    collector = Collector(broker.port)
    try:
        # Twenty devices: their messages fly together, more than aiomqtt's default threshold
        # of 10 pending calls.
        gateway = start_gateway(broker.port, n_nodes=20, node_batch=20)
        wait_until(lambda: all(n.acked >= 2000 for n in nodes), "2,000 readings from each node",
                   90)
        for node in nodes:
            node.stop()
        wait_until(lambda: collector.count() >= sum(n.acked for n in nodes),
                   "every reading at the subscriber", 30)
        assert gateway.terminate() == 0  # a clean stop is part of a fault-free run
    finally:
        collector.close()
    log = gateway.log()
    assert "connected to broker" in log
    assert warnings_and_errors(log) == []
