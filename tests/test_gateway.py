"""The gateway, end to end: emulated boards with the real firmware -> gateway -> Mosquitto."""

import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from helpers.gateway import GatewayProcess, exchange

from kinhbac import wire
from kinhbac.broker import LocalBroker
from kinhbac.emulator import launcher
from kinhbac.transport.serial_link import connect

NODE_SETTINGS = {
    "interval_ms": 50,
    "console_window_ms": 100,
    "send_after_ms": 100,
    "ack_timeout_ms": 3000,
    "backoff_min_ms": 100,
    "backoff_max_ms": 1000,
    "good_after_ms": 600000,
}


@pytest.fixture
def broker(tmp_path):
    """Persistent, unlike the shared fixture: the tests here stop and restart it."""
    with LocalBroker(tmp_path / "broker", persistence=True) as b:
        print(b.describe())
        yield b


class Site:
    """Nodes, their key file and a gateway process, torn down whatever happens."""

    def __init__(self, tmp_path, emulator, broker, **gateway_settings):
        self.tmp_path = tmp_path
        self.emulator = emulator
        self.broker = broker
        self.key_file = tmp_path / "keys.json"
        self.key_file.write_text('{"devices": []}')
        self.gateway = GatewayProcess(tmp_path / "gw", key_file=self.key_file,
                                      broker_port=broker.port, **gateway_settings)
        self.nodes: list[launcher.Node] = []

    def add_nodes(self, count, **settings):
        nodes = [launcher.provision(self.emulator, self.gateway.port, **(NODE_SETTINGS | settings))
                 for _ in range(count)]
        self.nodes += nodes
        launcher.write_key_file(self.key_file, self.nodes)
        return nodes

    def power_on(self):
        for node in self.nodes:
            node.board.power_on()


@pytest.fixture
def site(tmp_path, emulator, broker):
    s = Site(tmp_path, emulator, broker)
    yield s
    s.gateway.stop()


def assert_complete_and_ordered(collector, node, boot=1):
    keys = [k for k in collector.arrival[node.device] if k[0] == boot]
    seqs = [s for _, s in keys]
    assert seqs == list(range(1, len(seqs) + 1)), (
        f"{node.device}: gaps or disorder near {seqs[:3]}..{seqs[-3:]}")


def test_every_reading_reaches_the_broker_once_in_order_with_its_values(site, collector):
    nodes = site.add_nodes(5)
    for i, node in enumerate(nodes):
        node.bme280.set(temperature_c=15.0 + i, humidity_rh=50.0, pressure_pa=100000.0)
    site.gateway.start()
    site.power_on()
    collector.wait_for(lambda: all(collector.count(n.device) >= 150 for n in nodes),
                       what="150 readings from each node")
    for i, node in enumerate(nodes):
        assert_complete_and_ordered(collector, node)
        readings = collector.readings[node.device]
        temps = [r["value"] for (b, s), r in readings.items()
                 if r["sensor"] == "temperature" and s > 10]
        assert temps and all(abs(t - (15.0 + i)) <= 0.01 for t in temps)
        sample = next(iter(readings.values()))
        assert set(sample) >= {"seq", "sensor", "value", "unit", "ts", "pre_sync"}
        status = collector.retained[f"kinhbac/testsite/{node.device}/status"]
        assert status["firmware"] == "0.1.0" and status["boot"] == 1
        assert list(status["drops"]) == list(wire.DROP_NAMES)  # every counter the node sends
    gateway_status = collector.retained["kinhbac/testsite/gateway/gw1/status"]
    assert gateway_status["state"] == "online"
    metrics = site.gateway.metrics()
    assert metrics["kinhbac_gateway_readings_published_total"] >= 750
    assert metrics["kinhbac_gateway_uplink_connected"] == 1


@pytest.fixture
def lone_device(tmp_path, broker):
    """A gateway that knows one device, whose frames a test makes itself: (gateway, key)."""
    device = bytes.fromhex("6b62000000000042")
    secret = os.urandom(32)
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"devices": [
        {"device_id": device.hex(), "key_id": 1, "secret": secret.hex()}]}))
    gateway = GatewayProcess(tmp_path / "gw", key_file=key_file, broker_port=broker.port)
    gateway.start()
    yield gateway, wire.Key(device, 1, secret)
    gateway.stop()


def test_the_device_status_names_each_hello_counter_and_keeps_a_later_ones_place(
        lone_device, collector):
    gateway, key = lone_device
    counts = [10 + i for i in range(len(wire.DROP_NAMES) + 1)]  # one a later firmware adds
    hello = wire.encode_hello(key, 1, 1, "0.1.0", wire.RESET_WATCHDOG, counts,
                              [["temperature", "C"]])
    [ack] = exchange(gateway.port, [hello], [key], 1, 1)
    assert ack.type == wire.ACK
    topic = f"kinhbac/testsite/{key.device_id.hex()}/status"
    collector.wait_for(lambda: topic in collector.retained, what="the device's status")
    assert collector.retained[topic]["drops"] == {
        "buffer_full": 10, "storage_error": 11, "sensor_error": 12, "out_of_range": 13,
        "safe_mode": 14, "watchdog_resets": 15, "crashes": 16, "counter_7": 17}


def test_the_device_status_gives_each_sensors_failure_counts_by_name_when_the_hello_has_them(
        lone_device, collector):
    gateway, key = lone_device
    topic = f"kinhbac/testsite/{key.device_id.hex()}/status"
    sensors = [("temperature", "C"), ("level", "m")]
    hello = wire.encode_hello(key, 1, 1, "0.1.0", wire.RESET_POWER_ON, [0, 0, 7, 2], sensors,
                              [(7, 0), (0, 2)])
    exchange(gateway.port, [hello], [key], 1, 1)
    collector.wait_for(lambda: collector.retained.get(topic, {}).get("boot") == 1,
                       what="the device's status")
    assert collector.retained[topic]["sensor_failures"] == {
        "temperature": {"sensor_error": 7, "out_of_range": 0},
        "level": {"sensor_error": 0, "out_of_range": 2}}
    # A node whose firmware has no per-sensor counts: its status says nothing of them.
    older = wire.encode_hello(key, 2, 1, "0.0.9", wire.RESET_POWER_ON, [0, 0, 7, 2], sensors)
    exchange(gateway.port, [older], [key], 2, 1)
    collector.wait_for(lambda: collector.retained[topic].get("boot") == 2,
                       what="the older node's status")
    assert "sensor_failures" not in collector.retained[topic]


def test_the_device_status_carries_the_free_flash_the_hello_reported_and_null_without_it(
        lone_device, collector):
    gateway, key = lone_device
    topic = f"kinhbac/testsite/{key.device_id.hex()}/status"
    sensors = [("level", "m")]
    hello = wire.encode_hello(key, 1, 1, "0.2.0", wire.RESET_SOFT, [0] * 7, sensors, [(0, 0)],
                              413_696)
    exchange(gateway.port, [hello], [key], 1, 1)
    collector.wait_for(lambda: collector.retained.get(topic, {}).get("boot") == 1,
                       what="the device's status")
    assert collector.retained[topic]["free_flash_bytes"] == 413_696
    # Firmware before the section (or safe mode): null, not the last figure, nor left out.
    older = wire.encode_hello(key, 2, 1, "0.1.0", wire.RESET_SOFT, [0] * 7, sensors, [(0, 0)])
    exchange(gateway.port, [older], [key], 2, 1)
    collector.wait_for(lambda: collector.retained[topic].get("boot") == 2,
                       what="the older node's status")
    assert collector.retained[topic]["free_flash_bytes"] is None


def test_a_nodes_error_frames_are_logged_as_a_refusal_or_as_its_own_report(lone_device):
    gateway, key = lone_device
    device = key.device_id.hex()
    hello = wire.encode_hello(key, 1, 1, "0.1.0", wire.RESET_POWER_ON, [0] * 7, [["t", "C"]])
    refusal = wire.encode_error(key, 1, 2, wire.UNSUPPORTED, 17, "no setting 'colour'", False)
    report = wire.encode_error(key, 1, 3, wire.INTERNAL, 0, "flash worn out", False)
    exchange(gateway.port, [hello, refusal, report], [key], 1, 1)
    refused = f"node {device} refused our frame 17: UNSUPPORTED no setting 'colour'"
    reported = f"node {device} reports INTERNAL: flash worn out"
    deadline = time.monotonic() + 10
    while not (reported in gateway.log() and refused in gateway.log()):
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.05)


def test_a_chunk_request_for_a_release_not_offered_is_refused_and_a_result_recorded_unanswered(
        lone_device, collector):
    # This gateway (a key file: no rollouts) offers this node nothing: a node (or whoever holds
    # its key) asking for a chunk gets a signed refusal by name, its result is taken without an
    # answer, and nothing else of its session changes.
    gateway, key = lone_device
    device = key.device_id.hex()

    def readings(counter, first_seq):
        return wire.encode_readings(key, 1, counter, 1, first_seq, 1_800_000_000_000, False,
                                    [(0, 10 * i, 20.0 + first_seq + i) for i in range(5)])

    result = wire.encode_ota_result(key, 1, 4, 7, wire.OTA_FAILED, 0, "no offer")
    frames = [
        wire.encode_hello(key, 1, 1, "0.1.0", wire.RESET_POWER_ON, [0] * 7, [["t", "C"]]),
        wire.encode_ota_chunk_request(key, 1, 2, 7, 0, 0, wire.OTA_MAX_CHUNK),
        readings(3, 1),
        result,
        readings(5, 6),
        # Authentic but malformed: a request for no bytes.
        wire._frame(wire.OTA_CHUNK_REQUEST, key, 1, 6, struct.pack(">IBIH", 7, 0, 0, 0)),
        readings(7, 11),
    ]
    answers = exchange(gateway.port, frames, [key], 1, len(frames) - 1)
    # Each answer: an ACK and what it covers, or an ERROR's reason and the counter it refuses.
    got = [("ACK", a.through_seq) if a.type == wire.ACK else (a.reason_name, a.ref)
           for a in answers]
    assert got == [("ACK", None), ("UNSUPPORTED", 2), ("ACK", 5),
                   ("ACK", 10), ("BAD_PAYLOAD", 6), ("ACK", 15)]
    assert answers[1].detail == "release ref 00000007 is not offered to this node"
    # The result recorded and sent again, on a connection of its own: the replay window moved.
    [again] = exchange(gateway.port, [result], [key], 1, 1)
    assert (again.reason_name, again.ref) == ("REPLAY", 4)
    collector.wait_for(lambda: collector.count(device) == 15, what="the node's 15 readings")
    assert gateway.metrics()['kinhbac_gateway_frames_refused_total{reason="unsupported"}'] == 1
    log = gateway.log()
    assert f"refused a frame from {device}: UNSUPPORTED (release ref 00000007 is not offered" \
        in log
    assert f"node {device} reports failed for release ref 00000007 ('no offer'), which this " \
        "gateway neither offers it nor offered it last: not recorded" in log
    assert not collector.ota_progress  # nothing assigned: nothing to report


def test_a_node_in_safe_mode_is_shown_so_in_the_gateways_log_and_status_until_it_recovers(
        site, collector):
    (node,) = site.add_nodes(1, safe_mode_after=2, safe_mode_retry_s=5)
    node.board.write_files({"/buf": b"not a folder"})  # every start fails making the folder
    site.gateway.start()
    site.power_on()
    topic = f"kinhbac/testsite/{node.device}/status"
    collector.wait_for(lambda: "safe_mode" in collector.retained.get(topic, {}), timeout=60,
                       what="the status of the node in safe mode")
    reason = collector.retained[topic]["safe_mode"]
    assert reason.startswith("2 boots in a row failed; last error: OSError: [Errno 17] EEXIST")
    log = site.gateway.log()
    # It used to say "node <device> refused our frame 0: INTERNAL safe mode: ...".
    assert f"WARNING kinhbac.gateway.listener: node {node.device} is in safe mode: {reason}\n" \
        in log
    assert "refused our frame" not in log
    # A technician removes the cause at the REPL; the node's next normal boot says HELLO.
    connect(node.board.tty_path).fs_remove("/buf")  # Ctrl-C: the REPL, its retry off
    node.board.press_reset()  # safe mode once more (the bad boots), then a normal boot
    collector.wait_for(lambda: collector.count(node.device) >= 10, timeout=60,
                       what="readings of the node out of safe mode")
    collector.wait_for(lambda: "safe_mode" not in collector.retained[topic],
                       what="its status without safe mode")


def test_broker_stopped_for_ten_seconds_loses_nothing(site, collector, broker):
    nodes = site.add_nodes(3)
    site.gateway.start()
    site.power_on()
    # Every node, not just 300 readings in all: a node still associating has none to compare.
    collector.wait_for(lambda: all(collector.count(n.device) >= 100 for n in nodes),
                       what="readings of every node before the outage")
    broker.stop()
    time.sleep(10)
    assert site.gateway.metrics()["kinhbac_gateway_uplink_connected"] == 0
    queued = site.gateway.metrics()["kinhbac_gateway_queue_depth"]
    broker.start()
    before = {n.device: max(s for _, s in collector.readings[n.device]) for n in nodes}
    collector.wait_for(lambda: all(collector.count(n.device) >= before[n.device] + 300
                                   for n in nodes), timeout=90, what="catching up")
    assert queued > 0  # the gateway held readings while the broker was away
    for node in nodes:
        assert_complete_and_ordered(collector, node)
    assert any(m["replayed"] for m in collector.telemetry)


def test_the_gateway_status_reports_the_readings_queued_while_the_broker_was_down_until_drained(
        tmp_path, broker, collector):
    device = bytes.fromhex("6b62000000000043")
    secret = os.urandom(32)
    key = wire.Key(device, 1, secret)
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"devices": [
        {"device_id": device.hex(), "key_id": 1, "secret": secret.hex()}]}))
    gateway = GatewayProcess(tmp_path / "gw", key_file=key_file, broker_port=broker.port,
                             mqtt={"status_every_s": 5})
    try:
        gateway.start()
        collector.wait_for(lambda: any(s.get("queue_depth") == 0 and s["state"] == "online"
                                       for s in collector.gateway_statuses),
                           what="the first status: an empty queue")
        assert collector.gateway_statuses[-1]["oldest_queued_ms"] is None
        broker.stop()
        collector.wait_for(lambda: gateway.metrics()["kinhbac_gateway_uplink_connected"] == 0,
                           what="the gateway noticing the broker gone")
        before_ms = int(time.time() * 1000)
        frames = [wire.encode_readings(key, 1, n, 1, 1 + 150 * (n - 1), 1_800_000_000_000,
                                       False, [(0, 10 * i, 20.0 + i) for i in range(150)])
                  for n in (1, 2, 3)]
        answers = exchange(gateway.port, frames, [key], 1, 3)
        assert [a.through_seq for a in answers] == [150, 300, 450]  # durable: acknowledged
        after_ms = int(time.time() * 1000)
        heard = len(collector.gateway_statuses)
        broker.start()
        # The new session's first status tells the backlog as it stands before it drains.
        collector.wait_for(lambda: any(s.get("queue_depth") for s in
                                       collector.gateway_statuses[heard:]),
                           what="a status with the queued readings")
        backlog = next(s for s in collector.gateway_statuses[heard:] if s.get("queue_depth"))
        assert backlog["state"] == "online"
        assert backlog["queue_depth"] == 450
        assert before_ms <= backlog["oldest_queued_ms"] <= after_ms
        collector.wait_for(lambda: collector.count(device.hex()) == 450,
                           what="the 450 readings delivered")
        # Drained: the next periodic status (every 5 s here) says so, with no oldest reading.
        drained = len(collector.gateway_statuses)
        collector.wait_for(lambda: any(s.get("queue_depth") == 0 for s in
                                       collector.gateway_statuses[drained:]),
                           timeout=15, what="a status of the drained queue")
        assert collector.gateway_statuses[-1]["oldest_queued_ms"] is None
        assert gateway.metrics()["kinhbac_gateway_queue_depth"] == 0
    finally:
        gateway.stop()


def test_gateway_power_cut_loses_nothing_acked(site, collector):
    nodes = site.add_nodes(3)
    site.gateway.start()
    site.power_on()
    # Every node, not just 300 readings in all: a node still associating has none to compare.
    collector.wait_for(lambda: all(collector.count(n.device) >= 100 for n in nodes),
                       what="readings of every node before the cut")
    site.gateway.kill()
    time.sleep(2)  # the nodes buffer; their ACKs stop
    site.gateway.start()
    before = {n.device: max(s for _, s in collector.readings[n.device]) for n in nodes}
    collector.wait_for(lambda: all(collector.count(n.device) >= before[n.device] + 200
                                   for n in nodes), timeout=90, what="catching up")
    for node in nodes:
        # A gap would be a reading the gateway acked (so the node forgot it) but lost.
        assert_complete_and_ordered(collector, node)


def test_sigterm_drains_and_marks_the_gateway_offline(site, collector):
    site.add_nodes(1)
    site.gateway.start()
    site.power_on()
    collector.wait_for(lambda: collector.count() >= 50)
    assert site.gateway.terminate() == 0
    collector.wait_for(lambda: collector.retained.get(
        "kinhbac/testsite/gateway/gw1/status", {}).get("state") == "offline", what="offline")
    assert "stopped;" in site.gateway.log()


class Attacker:
    """A CPython peer speaking the codec badly, on purpose."""

    def __init__(self, port):
        self.port = port

    def send(self, data: bytes, timeout: float = 15.0) -> bytes:
        """Send `data`; return the first frame the gateway answers, or b"" if it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            got = b""
            while len(got) < wire.HEADER_SIZE or len(got) < wire.frame_length(
                    got[:wire.HEADER_SIZE]):
                chunk = s.recv(4096)
                if not chunk:
                    return got
                got += chunk
            return got


def test_forged_replayed_malformed_oversized_and_slow_frames_are_refused_while_nodes_flow(
        site, collector):
    nodes = site.add_nodes(2)
    secret = os.urandom(32)
    known = wire.Key(bytes.fromhex("6b6200000000beef"), 1, secret)
    rows = [{"device_id": n.device, "key_id": 1, "secret": n.secret.hex()} for n in nodes]
    rows.append({"device_id": "6b6200000000beef", "key_id": 1, "secret": secret.hex()})
    site.key_file.write_text(json.dumps({"devices": rows}))
    site.gateway.start()
    site.power_on()
    collector.wait_for(lambda: collector.count() >= 100)
    attacker = Attacker(site.gateway.port)

    forged = wire.encode_hello(wire.Key(known.device_id, 1, os.urandom(32)), 1, 1, "x", 0, [], [])
    assert attacker.send(forged) == b""  # closed without an answer
    hello = wire.encode_hello(known, 1, 1, "x", 0, [], [])
    first = attacker.send(hello)
    assert first  # an honest HELLO gets its ACK
    replay = attacker.send(hello)  # the very same bytes again
    assert wire.ERROR_DOWN in replay[:2]
    unknown = wire.encode_hello(wire.Key(b"nobody!!", 1, os.urandom(32)), 1, 1, "x", 0, [], [])
    attacker.send(unknown)
    junk = bytearray(os.urandom(300))
    junk[0] = wire.VERSION + 1  # random, but never (1 time in 256) a header of our version
    assert attacker.send(bytes(junk)) == b""
    oversized = bytearray(forged)
    oversized[2:4] = (5000).to_bytes(2, "big")
    assert attacker.send(bytes(oversized)) == b""
    # Slow-loris: half a header, then nothing; the gateway must close it after frame_timeout_s.
    slow = socket.create_connection(("127.0.0.1", site.gateway.port))
    slow.sendall(hello[:30])
    slow.settimeout(20)
    started = time.monotonic()
    assert slow.recv(10) == b""
    assert time.monotonic() - started < 15
    slow.close()

    before = collector.count()
    collector.wait_for(lambda: collector.count() >= before + 100, what="honest nodes flowing")
    m = site.gateway.metrics()
    for reason in ("bad_mac", "replay", "unknown_device", "bad_version", "bad_length",
                   "incomplete_frame"):
        assert m.get(f'kinhbac_gateway_frames_refused_total{{reason="{reason}"}}', 0) >= 1, (
            reason, {k: v for k, v in m.items() if "refused" in k})
    for node in nodes:
        assert_complete_and_ordered(collector, node)


def outage_until_the_queue_drops(site, broker, collector, reason):
    """Run nodes, take the broker away until the gateway drops queued readings for `reason`,
    then check it kept acknowledging, reported the drops upstream, and flows again."""
    nodes = site.add_nodes(2, interval_ms=20)
    site.gateway.start()
    site.power_on()
    collector.wait_for(lambda: collector.count() >= 100)
    broker.stop()
    dropped = f'kinhbac_gateway_readings_dropped_total{{reason="{reason}"}}'
    deadline = time.monotonic() + 120
    while site.gateway.metrics().get(dropped, 0) == 0:
        assert time.monotonic() < deadline, f"no {reason} drop within 120 s"
        time.sleep(1)
    acked = site.gateway.metrics()["kinhbac_gateway_readings_acked_total"]
    time.sleep(3)
    assert site.gateway.metrics()["kinhbac_gateway_readings_acked_total"] > acked
    assert site.gateway.proc.poll() is None
    broker.start()
    collector.wait_for(lambda: collector.retained.get(
        "kinhbac/testsite/gateway/gw1/status", {}).get("dropped", {}).get(reason, 0) > 0,
        timeout=60, what="the drop count in the gateway's status")
    before = collector.count()
    collector.wait_for(lambda: collector.count() >= before + 200, what="flowing again")
    for node in nodes:
        seqs = sorted(s for _, s in collector.readings[node.device])
        # The oldest of the outage are gone, the newest arrived; no gap after the drop.
        tail = seqs[-100:]
        assert tail == list(range(tail[0], tail[0] + len(tail)))


def test_disk_cap_drops_the_oldest_counts_them_and_keeps_serving(tmp_path, emulator, broker,
                                                                 collector):
    site = Site(tmp_path, emulator, broker, disk_cap_bytes=256 * 1024)
    try:
        outage_until_the_queue_drops(site, broker, collector, "disk_cap")
    finally:
        site.gateway.stop()


def test_config_file_for_a_node_is_delivered_on_its_next_hello(tmp_path, emulator, broker,
                                                              collector):
    config_dir = tmp_path / "node-config"
    config_dir.mkdir()
    site = Site(tmp_path, emulator, broker, node_config_dir=config_dir)
    try:
        (node,) = site.add_nodes(1)
        (config_dir / f"{node.device}.json").write_text('{"interval_ms": 200}')
        site.gateway.start()
        site.power_on()
        node.board.console.wait_for("CONFIG applied: interval_ms", timeout=30)
    finally:
        site.gateway.stop()


def test_bad_config_stops_the_gateway_with_one_line_naming_the_field(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('site = "ok"\nkey_file = "/nonexistent"\n[mqtt]\nport = "eighty"\n')
    done = subprocess.run([sys.executable, "-m", "kinhbac.cli", "gateway", "run", "-c",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mqtt.port" in lines[0], done.stderr
    config.write_text('site = "Bad Site!"\nkey_file = "/nonexistent"\n')
    done = subprocess.run([sys.executable, "-m", "kinhbac.cli", "gateway", "run", "-c",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "site" in done.stderr


def test_gateway_help_explains_every_setting():
    done = subprocess.run([sys.executable, "-m", "kinhbac.cli", "gateway", "settings"],
                          capture_output=True, text=True, timeout=30)
    from kinhbac.gateway.config import GatewaySettings, MqttSettings
    for name in GatewaySettings.model_fields:
        assert f"{name} = " in done.stdout or f"[{name}]" in done.stdout, name
    for name in MqttSettings.model_fields:
        assert f"mqtt.{name} = " in done.stdout, name
    assert "KINHBAC_GATEWAY_MQTT__PORT" in done.stdout


def test_prometheus_metrics_name_what_the_issue_asks_for(site, collector):
    site.add_nodes(1)
    site.gateway.start()
    site.power_on()
    collector.wait_for(lambda: collector.count() >= 20)
    names = set(site.gateway.metrics())
    for wanted in ("kinhbac_gateway_readings_received_total", "kinhbac_gateway_readings_acked_total",
                   "kinhbac_gateway_readings_published_total", "kinhbac_gateway_queue_depth",
                   "kinhbac_gateway_queue_oldest_age_seconds", "kinhbac_gateway_uplink_connected",
                   "kinhbac_gateway_uplink_reconnects_total",
                   "kinhbac_gateway_commit_seconds_count"):
        assert wanted in names, wanted


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB filesystem for the gateway's data, as a nearly full SD card."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                   check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_refuses_new_readings_and_keeps_every_acknowledged_one(
        tmp_path, emulator, broker, collector, small_disk):
    """Another program fills the card during a broker outage: the gateway refuses new frames
    (the nodes keep them in flash) rather than deleting readings it acknowledged, and once
    there is room again every reading arrives, with no gap."""
    site = Site(tmp_path, emulator, broker, data_dir=small_disk)
    try:
        nodes = site.add_nodes(2, interval_ms=20)
        site.gateway.start()
        site.power_on()
        collector.wait_for(lambda: collector.count() >= 100)
        broker.stop()
        time.sleep(2)
        filler = small_disk / "other-program.log"
        with open(filler, "wb", buffering=0) as f:  # the disk fills to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        full = 'kinhbac_gateway_storage_faults_total{kind="disk_full"}'
        refused = 'kinhbac_gateway_frames_refused_total{reason="busy"}'
        deadline = time.monotonic() + 60
        while site.gateway.metrics().get(refused, 0) == 0:
            assert time.monotonic() < deadline, "the full disk never refused a frame"
            time.sleep(0.5)
        time.sleep(3)
        metrics = site.gateway.metrics()
        assert metrics.get(full, 0) >= 1
        assert not [k for k in metrics if k.startswith("kinhbac_gateway_readings_dropped_total")
                    and metrics[k] > 0], metrics
        filler.unlink()
        broker.start()
        for node in nodes:
            collector.wait_for(lambda n=node: collector.count(n.device) >= 400, timeout=90,
                               what="the readings kept on the node")
            assert_complete_and_ordered(collector, node)
        log = site.gateway.log()
        assert log.count("the disk is full") == 1, log[-3000:]
        assert site.gateway.proc.poll() is None
    finally:
        site.gateway.stop()


@pytest.mark.parametrize("toml, field", [
    ('site = "s"\nkey_file = "/k.json"\n[mqtt]\nhost = "mqtt.example.org"\n', "mqtt"),
    ('site = "s"\nfleet_url = "http://fleet.example.org"\nfleet_token = "kbg_x"\n',
     "allow_plaintext_fleet"),
])
def test_plaintext_to_another_machine_is_refused_unless_allowed_by_name(tmp_path, toml, field):
    """A site's broker password, gateway token and device secrets never cross a network in
    clear by accident: the setting that allows it must be named."""
    from kinhbac.gateway.config import ConfigError, load_settings

    config = tmp_path / "gw.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match="allow_plaintext"):
        load_settings(config)
    allowed = toml.replace("[mqtt]\n", "[mqtt]\nallow_plaintext = true\n") if field == "mqtt" \
        else toml + "allow_plaintext_fleet = true\n"
    config.write_text(allowed)
    assert load_settings(config).site == "s"


def test_a_gateway_status_more_often_than_every_5_s_is_refused_naming_the_setting(tmp_path):
    # A retained status a second from each of a city's gateways would be the broker's and the
    # fleet's load for nothing: the queue changes little between two statuses.
    from kinhbac.gateway.config import ConfigError, load_settings

    config = tmp_path / "gw.toml"
    config.write_text('site = "s"\nkey_file = "/k.json"\n[mqtt]\nstatus_every_s = 1\n')
    with pytest.raises(ConfigError, match=r"mqtt\.status_every_s.*greater than or equal to 5"):
        load_settings(config)
    config.write_text('site = "s"\nkey_file = "/k.json"\n[mqtt]\nstatus_every_s = 5\n')
    assert load_settings(config).mqtt.status_every_s == 5
    config.write_text('site = "s"\nkey_file = "/k.json"\n')
    assert load_settings(config).mqtt.status_every_s == 30


def test_a_key_file_nested_past_the_parsers_depth_is_a_configuration_error(tmp_path):
    """A key file mangled (or planted) into deep nesting used to raise RecursionError, which
    ended the gateway as a crash, restarted, and crashed again."""
    keys = tmp_path / "keys.json"
    keys.write_text("[" * 100_000 + "]" * 100_000)
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s"\nkey_file = "{keys}"\nmetrics_port = 0\nlisten_port = 0\n'
                      f'data_dir = "{tmp_path / "data"}"\n')
    done = subprocess.run([sys.executable, "-m", "kinhbac.cli", "gateway", "run", "-c",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "key file" in done.stderr and "RecursionError" in done.stderr


def test_a_queue_written_by_a_newer_gateway_stops_start_up_with_what_to_do(tmp_path):
    """Going back to an older release over a newer queue layout used to start, then fail every
    commit (BUSY to every node, for ever). Now it is refused at start, once, exit 2: systemd's
    unit does not restart it, and the file is left as it was."""
    import apsw

    from kinhbac.gateway.queue import SCHEMA_VERSION

    keys = tmp_path / "keys.json"
    keys.write_text('{"devices": []}')
    data = tmp_path / "data"
    data.mkdir()
    queue_file = data / "queue.sqlite3"
    db = apsw.Connection(str(queue_file))
    db.execute(f"CREATE TABLE future (x); PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = queue_file.read_bytes()
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s"\nkey_file = "{keys}"\nmetrics_port = 0\nlisten_port = 0\n'
                      f'data_dir = "{data}"\n')
    done = subprocess.run([sys.executable, "-m", "kinhbac.cli", "gateway", "run", "-c",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "newer gateway" in done.stderr and "move the file aside" in done.stderr
    assert queue_file.read_bytes() == before
