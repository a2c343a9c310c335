"""The demo's live view: per site, what reached the broker from each device, and the gateway's
queue and uplink."""

import math
import threading
import time
from collections import defaultdict, deque

import paho.mqtt.client as paho
from rich.console import Group
from rich.table import Table
from rich.text import Text

from kinhbac import mqtt_contract
from kinhbac.demo.site import DemoSite

RATE_WINDOW_S = 5.0


class BrokerView:
    """What reaches the broker: last values and arrival times per device."""

    def __init__(self, port: int, sites: list[str]) -> None:
        self.lock = threading.Lock()
        self.latest: dict[str, dict[str, float]] = defaultdict(dict)
        self.seen: dict[str, set[tuple[int, int]]] = defaultdict(set)
        self.arrivals: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.boot: dict[str, int] = {}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        topics = [(mqtt_contract.telemetry_filter(mqtt_contract.DEFAULT_PREFIX, site), 1)
                  for site in sites]
        self.client.on_connect = lambda c, *_: c.subscribe(topics)
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


def render(sites: list[DemoSite], broker: BrokerView, header: str) -> Group:
    """The whole view: a table per site, then how to stop."""
    parts: list[Table | Text] = [Text(header)]
    for site in sites:
        parts += _site_view(site, broker)
    return Group(*parts, Text("Ctrl-C stops everything.", style="dim"))


def _site_view(site: DemoSite, broker: BrokerView) -> list[Table | Text]:
    nodes, gateway = site.nodes, site.gateway
    assert gateway is not None, "started sites only"
    table = Table(title=f"{site.plan.name} ('{site.plan.slug}'): emulated ESP32 nodes -> "
                  "gateway -> MQTT")
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
        ("gateway ", "bold"), f"{site.gateway_name}: {len(gateway.keys)} device keys from the "
        f"fleet, queue depth {stats.depth} (oldest {age}), uplink {gateway.uplink.state}, "
        f"{gateway.uplink.published} readings published",
    )
    return [table, footer]


