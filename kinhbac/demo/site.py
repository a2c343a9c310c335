"""A demo site: enrolled in the fleet as an admin would, its boards registered as a technician
would, a gateway that fetches their keys from the fleet, and boards whose sensors drift."""

import asyncio
import functools
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kinhbac import wire
from kinhbac.demo.errors import DemoError
from kinhbac.demo.fleet import DemoFleet
from kinhbac.emulator import launcher
from kinhbac.emulator.site import Emulator
from kinhbac.firmware import config_file, firmware_files
from kinhbac.gateway.config import load_settings
from kinhbac.gateway.daemon import Gateway

SAMPLING_MS = 500  # quicker than a field node, so that the view moves
GATEWAY_START_S = 60.0  # the first key listing from the fleet, on a loaded laptop
KEY_REFRESH_S = 10.0  # a device registered or revoked in the console shows within seconds


@dataclass(frozen=True)
class SitePlan:
    slug: str  # the site in MQTT topics
    name: str  # as the console shows it


@functools.cache
def _firmware() -> dict[str, bytes]:
    return firmware_files()  # mpy-cross once, not once per board


class GatewayThread:
    """The gateway on an event loop of its own, stopped as SIGTERM would stop it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.gateway.run())
        except BaseException as exc:  # kept for wait_ready's message; the log has the rest
            self.error = exc

    def wait_ready(self, timeout: float = GATEWAY_START_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.gateway.ready.is_set():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise DemoError(f"the gateway {self.gateway.settings.gateway_id} did not start"
                                + (f": {self.error}" if self.error else ""))
            time.sleep(0.05)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.gateway.stop)
        self.thread.join(timeout=20)


class DemoSite:
    """One site of the demo; start() brings it up, stop() powers it down."""

    def __init__(self, plan: SitePlan, fleet: DemoFleet, emulator: Emulator, workdir: Path,
                 broker: tuple[str, int]) -> None:
        self.plan = plan
        self.fleet = fleet
        self.emulator = emulator
        self.workdir = workdir
        self.broker = broker
        self.nodes: list[launcher.Node] = []
        self.runner: GatewayThread | None = None
        self.gateway: Gateway | None = None

    def enrol(self, boards: int, admin: str, technician: str) -> None:
        """The site and its gateway in the fleet (with the admin's token), then its boards (with
        the technician's: each registered by its MAC, the identity the fleet issued kept for
        flashing)."""
        self.site_id = self.fleet.call("POST", "/api/sites", admin, json={
            "name": self.plan.name, "slug": self.plan.slug,
            "sensor_kit": launcher.SENSOR_KIT})["id"]
        self.gateway_name = f"{self.plan.slug}-gw"
        self.gateway_token = self.fleet.call("POST", "/api/gateways", admin, json={
            "name": self.gateway_name, "site_id": self.site_id})["token"]
        for _ in range(boards):
            board = self.emulator.add_board()
            device = self.fleet.call("POST", "/api/devices", technician, json={
                "mac": board.mac.hex(":"), "site_id": self.site_id})
            secret = bytes.fromhex(device["secret"])
            key = wire.Key(bytes.fromhex(device["wire_id"]), device["key_id"], secret)
            self.nodes.append(launcher.wired_node(board, key, secret))

    def start(self) -> None:
        """The gateway (its keys from the fleet), then the boards flashed for its port."""
        settings = load_settings(
            None, site=self.plan.slug, gateway_id=self.gateway_name, listen_host="127.0.0.1",
            listen_port=0, data_dir=self.workdir / "gateway", metrics_port=0,
            fleet_url=self.fleet.url, fleet_token=self.gateway_token,
            key_refresh_s=KEY_REFRESH_S,
            mqtt={"host": self.broker[0], "port": self.broker[1]},
            # Every emulated board connects from 127.0.0.1, unlike nodes on a site's WiFi.
            max_connections_per_address=2000,
        )
        self.gateway = Gateway(settings)
        self.runner = GatewayThread(self.gateway)
        self.runner.wait_ready()
        for node in self.nodes:
            config = launcher.node_config(node, self.gateway.listener.port, self.emulator,
                                          interval_ms=SAMPLING_MS, console_window_ms=500)
            node.board.write_files(_firmware() | config_file(config))
            node.board.power_on()

    def stop(self) -> None:
        for node in self.nodes:
            if node.board.running:
                node.board.power_cut(restore=False)
        if self.runner is not None:
            self.runner.stop()


def weather(nodes: list[launcher.Node], stop: threading.Event) -> None:
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
