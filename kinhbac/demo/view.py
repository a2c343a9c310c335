"""`make demo`: a whole site on one machine, and a live view of it.

A private MQTT broker (Mosquitto when it is installed, else the embedded amqtt; the demo says
which), the gateway, and emulated ESP32 boards running the real firmware with a sensor kit
whose values drift. The view shows, per device, what reached the broker, and the gateway's
queue and uplink. Ctrl-C stops everything; nothing is left running.
"""

import asyncio
import math
import random
import shutil
import signal
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

import paho.mqtt.client as paho
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kinhbac import mqtt_contract
from kinhbac.broker import LocalBroker
from kinhbac.emulator import launcher
from kinhbac.emulator.site import Emulator
from kinhbac.gateway.config import load_settings
from kinhbac.gateway.daemon import Gateway

REFRESH_S = 0.5
RATE_WINDOW_S = 5.0
SAMPLING_MS = 500  # quicker than a field node, so that the view moves
SITE = "demo"


class BrokerView:
    """What reaches the broker: last values and arrival times per device."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.latest: dict[str, dict[str, float]] = defaultdict(dict)
        self.seen: dict[str, set[tuple[int, int]]] = defaultdict(set)
        self.arrivals: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.boot: dict[str, int] = {}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        topics = mqtt_contract.telemetry_filter(mqtt_contract.DEFAULT_PREFIX, SITE)
        self.client.on_connect = lambda c, *_: c.subscribe(topics, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        telemetry = mqtt_contract.parse_telemetry(msg.payload)
        device = telemetry.device
        with self.lock:
            fresh = 0
            for r in telemetry.readings:
                key = (telemetry.boot, r.seq)
                if key not in self.seen[device]:  # at-least-once: count each reading once
                    self.seen[device].add(key)
                    fresh += 1
                self.latest[device][r.sensor] = r.value if r.value is not None else math.nan
            self.boot[device] = telemetry.boot
            self.arrivals[device].append((time.monotonic(), fresh))

    def rate(self, device: str) -> float:
        now = time.monotonic()
        with self.lock:
            window = self.arrivals[device]
            while window and now - window[0][0] > RATE_WINDOW_S:
                window.popleft()
            return sum(n for _, n in window) / RATE_WINDOW_S

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class GatewayThread:
    """The gateway on an event loop of its own, stopped as SIGTERM would stop it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.loop.run_until_complete(self.gateway.run())

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.gateway.ready.is_set():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.gateway.stop)
        self.thread.join(timeout=20)


def _weather(nodes: list[launcher.Node], stop: threading.Event) -> None:
    """Move the sensor models slowly, each node a little differently."""
    start = time.monotonic()
    for node in nodes:
        node.meter.start(rate_hz=random.uniform(0.5, 3.0))
    while not stop.wait(0.5):
        t = time.monotonic() - start
        for i, node in enumerate(nodes):
            node.bme280.set(
                temperature_c=18 + 4 * math.sin(t / 60 + i) + random.uniform(-0.05, 0.05),
                humidity_rh=55 + 10 * math.sin(t / 90 + i),
                pressure_pa=101325 + 150 * math.sin(t / 120 + i),
            )
            node.level.volts = 1.2 + 0.4 * math.sin(t / 30 + i)
    for node in nodes:
        node.meter.stop()


def _view(nodes: list[launcher.Node], broker: BrokerView, gateway: Gateway,
          broker_line: str) -> Group:
    table = Table(title=f"Kinhbac demo: site '{SITE}', emulated ESP32 nodes -> gateway -> MQTT")
    table.add_column("device", no_wrap=True)
    for column in ("boot", "at broker", "/s", "temp C", "RH %", "hPa", "level m", "water L"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("WiFi", no_wrap=True)
    for node in nodes:
        latest = broker.latest.get(node.device, {})

        def show(sensor: str, fmt: str, scale: float = 1.0,
                 latest: dict[str, float] = latest) -> str:
            return fmt.format(latest[sensor] * scale) if sensor in latest else "-"

        table.add_row(
            node.device,
            str(broker.boot.get(node.device, "-")),
            str(len(broker.seen.get(node.device, ()))),
            f"{broker.rate(node.device):.1f}",
            show("temperature", "{:.2f}"),
            show("humidity", "{:.1f}"),
            show("pressure", "{:.2f}", 0.01),
            show("level", "{:.3f}"),
            show("water", "{:.1f}"),
            "up" if node.board.link_up else "down",
        )
    stats = gateway.queue.stats
    oldest = stats.oldest_received_ms
    age = f"{max(0.0, time.time() - oldest / 1000):.1f} s" if oldest else "-"
    footer = Text.assemble(
        ("gateway ", "bold"), f"queue depth {stats.depth} (oldest {age}), ",
        f"uplink {gateway.uplink.state}, {gateway.uplink.published} readings published; ",
        ("broker ", "bold"), broker_line,
    )
    return Group(table, footer, Text("Ctrl-C stops everything.", style="dim"))


def run_demo(boards: int, workdir: Path) -> None:
    console = Console()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Resolved once, here: the default (run/demo) is relative to where `make demo` runs, and
    # the broker and the boards' interpreters are handed paths in it from other folders.
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)  # fresh identities and an empty queue each run
    workdir.mkdir(parents=True)
    with LocalBroker(workdir / "broker") as broker, Emulator(workdir / "boards") as emu:
        broker_line = broker.describe()
        console.print(f"Broker: {broker_line}")
        settings = load_settings(
            None, site=SITE, gateway_id="demo-gw", listen_host="127.0.0.1", listen_port=0,
            data_dir=workdir / "gateway", key_file=_empty_key_file(workdir), metrics_port=0,
            mqtt={"host": broker.host, "port": broker.port},
            # Every emulated board connects from 127.0.0.1, unlike nodes on a site's WiFi.
            max_connections_per_address=2000,
        )
        gateway = Gateway(settings)
        runner = GatewayThread(gateway)
        runner.wait_ready()
        port = gateway.listener.port
        nodes = [launcher.provision(emu, port, interval_ms=SAMPLING_MS, console_window_ms=500)
                 for _ in range(boards)]
        launcher.write_key_file(settings.key_file, nodes)
        gateway.keys.refresh()
        console.print(f"Gateway: nodes on 127.0.0.1:{port}, metrics on "
                      f"http://127.0.0.1:{gateway.metrics_port}/metrics, queue in "
                      f"{settings.database}")
        view = BrokerView(broker.port)
        for node in nodes:
            node.board.power_on()
        console.print(f"{boards} boards; serial ports: "
                      f"{', '.join(n.board.tty_path for n in nodes)}")
        weather = threading.Thread(target=_weather, args=(nodes, stop), daemon=True)
        weather.start()
        try:
            with Live(_view(nodes, view, gateway, broker_line), console=console,
                      refresh_per_second=4) as live:
                while not stop.wait(REFRESH_S):
                    live.update(_view(nodes, view, gateway, broker_line))
        except KeyboardInterrupt:
            pass
        stop.set()
        console.print("Stopping the boards, the gateway and the broker ...")
        weather.join(timeout=5)
        view.close()
        for node in nodes:
            node.board.power_cut(restore=False)
        runner.stop()
    console.print("Done; nothing left running.")


def _empty_key_file(workdir: Path) -> Path:
    path = workdir / "keys.json"
    path.write_text('{"devices": []}')
    return path
