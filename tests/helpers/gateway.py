"""The gateway as a separate process (so that a test can SIGKILL it), and an MQTT subscriber
that collects what reaches the broker."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from pydantic import ValidationError

from kinhbac import mqtt_contract, wire


def read_exactly(s: socket.socket, n: int) -> bytes:
    """n bytes from a blocking socket; ConnectionError if the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"the peer closed the connection after {len(data)} of {n} "
                                  "bytes")
        data += chunk
    return data


def read_downlink_frame(s: socket.socket, key: wire.Key, guard: wire.DownlinkGuard
                        ) -> wire.Message:
    """The gateway's next frame to a node holding `key`, verified."""
    header = read_exactly(s, wire.HEADER_SIZE)
    body = read_exactly(s, wire.frame_length(header) - wire.HEADER_SIZE)
    return wire.decode(header + body, wire.lookup_for(key), guard, downlink=True)


def exchange(port: int, frames: list[bytes], keys: list[wire.Key], boot: int,
             answers: int | None = None, *, timeout_s: float = 10.0) -> list[wire.Message]:
    """Send frames on a fresh connection, as a node at `boot` holding `keys` would; the
    gateway's answers, verified: the first `answers` of them, or (None) all until it closes the
    connection or is silent for `timeout_s`."""
    by_key_id = {k.key_id: k for k in keys}

    def lookup(device_id: bytes, key_id: int) -> wire.Key | int | None:
        return by_key_id.get(key_id, wire.UNKNOWN_KEY)

    guard = wire.DownlinkGuard(boot)
    guard.last_sent = wire.MAX_UPLINK_COUNTER  # answers to any counter the test sent
    got: list[wire.Message] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(b"".join(frames))
        while answers is None or len(got) < answers:
            try:
                header = read_exactly(conn, wire.HEADER_SIZE)
            except (ConnectionError, TimeoutError):
                break
            body = read_exactly(conn, wire.frame_length(header) - wire.HEADER_SIZE)
            got.append(wire.decode(header + body, lookup, guard, downlink=True))
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


class GatewayProcess:
    """`kinhbac gateway run` in a subprocess, with its TOML written from keyword settings."""

    def __init__(self, workdir: Path, *, key_file: Path | None, broker_port: int,
                 mqtt: dict[str, Any] | None = None, **settings: Any) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = settings.pop("listen_port", None) or free_port()
        self.metrics_port = free_port()
        self.config = self.workdir / "gateway.toml"
        values = {
            "site": "testsite",
            "gateway_id": "gw1",
            "listen_host": "127.0.0.1",
            "listen_port": self.port,
            "data_dir": self.workdir / "data",
            "key_file": key_file,
            "metrics_port": self.metrics_port,
            "commit_window_ms": 1.0,
            # Every test node connects from 127.0.0.1, unlike nodes on a site's WiFi.
            "max_connections_per_address": 2000,
        } | settings
        lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("[mqtt]")
        mqtt_values = {"host": "127.0.0.1", "port": broker_port, "backoff_min_s": 0.2,
                       "backoff_max_s": 1.0} | (mqtt or {})
        lines += [f"{k} = {_toml_value(v)}" for k, v in mqtt_values.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = self.workdir / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "GatewayProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kinhbac.cli", "gateway", "run", "-c", str(self.config)],
            stdout=log, stderr=log, env=dict(os.environ),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.metrics()
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start:\n{self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """A power cut: SIGKILL, no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def metrics(self) -> dict[str, float]:
        """The /metrics endpoint as {"name{labels}": value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=2).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


_PARSERS = {"telemetry": mqtt_contract.parse_telemetry,
            "device_status": mqtt_contract.parse_device_status,
            "gateway_status": mqtt_contract.parse_gateway_status,
            "ota_progress": mqtt_contract.parse_ota_progress}


class Collector:
    """A subscriber on the site's topics with a persistent session, so that what is published
    while it reconnects (after a broker restart) still reaches it. Deduplicates readings, and
    keeps in `outside_contract` what kinhbac/mqtt_contract.py's parsers refuse."""

    def __init__(self, port: int, topic: str = "kinhbac/#") -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=f"collector-{port}-{time.monotonic_ns()}",
                                  clean_session=False)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.readings: dict[str, dict[tuple[int, int], dict]] = defaultdict(dict)
        self.arrival: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.telemetry: list[dict] = []
        self.retained: dict[str, Any] = {}
        self.ota_progress: list[dict] = []  # OTA progress, in the order it arrived
        self.gateway_statuses: list[dict] = []  # every gateway status, in the order it arrived
        self.outside_contract: list[tuple[str, str]] = []  # (topic, the parser's reason)
        self.lock = threading.Lock()
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._check_contract(msg.topic, msg.payload)
        payload = json.loads(msg.payload)
        with self.lock:
            if msg.topic.endswith("/telemetry"):
                self.telemetry.append(payload)
                for r in payload["readings"]:
                    key = (payload["boot"], r["seq"])
                    if key not in self.readings[payload["device"]]:
                        self.readings[payload["device"]][key] = r
                        self.arrival[payload["device"]].append(key)
            elif msg.topic.endswith("/" + mqtt_contract.OTA):
                self.ota_progress.append(payload)
            else:
                self.retained[msg.topic] = payload
                if f"/{mqtt_contract.GATEWAY}/" in msg.topic and \
                        msg.topic.endswith("/" + mqtt_contract.STATUS):
                    self.gateway_statuses.append(payload)

    def _check_contract(self, topic: str, payload: bytes) -> None:
        if not payload or topic.endswith("/" + mqtt_contract.PROBE):
            return  # a retained status cleared; the gateway's write check, read by no consumer
        try:
            kind = mqtt_contract.parse_topic(topic.split("/", 1)[0], topic).kind
            _PARSERS[kind](payload)
        except (mqtt_contract.TopicError, ValidationError) as exc:
            with self.lock:
                self.outside_contract.append((topic, str(exc)))

    def count(self, device: str | None = None) -> int:
        with self.lock:
            if device is not None:
                return len(self.readings[device])
            return sum(len(v) for v in self.readings.values())

    def wait_for(self, condition: Any, timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what or 'condition'} not met in {timeout} s; "
                                   f"collector has {self.count()} readings")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
