"""`make demo`: emulated boards running the real firmware, and a live view of what arrives.

Until the gateway exists, the boards send to the test receiver (kinhbac/emulator/receiver.py),
which verifies every frame and acknowledges each batch; the view shows what it has received.
"""

import math
import random
import shutil
import signal
import threading
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from kinhbac.emulator import launcher
from kinhbac.emulator.receiver import Receiver
from kinhbac.emulator.site import Emulator

REFRESH_S = 0.5
SAMPLING_MS = 500  # quicker than a field node, so that the view moves


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


def _view(nodes: list[launcher.Node], rx: Receiver, rates: dict[str, float]) -> Table:
    table = Table(title="Kinhbac demo: emulated ESP32 nodes -> test receiver", expand=True)
    table.add_column("device", no_wrap=True)
    for column in ("boot", "readings", "/s", "temp C", "RH %", "hPa", "level m", "water L"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("WiFi", no_wrap=True)
    for node in nodes:
        readings = rx.readings_of(node.device)
        latest: dict[int, float] = {}
        for r in readings[-10:]:
            latest[r.sensor] = r.value

        def show(index: int, fmt: str, scale: float = 1.0) -> str:
            return fmt.format(latest[index] * scale) if index in latest else "-"

        view = rx.devices.get(node.device)
        link = "up" if node.board.link_up else "down"
        table.add_row(
            node.device,
            str(readings[-1].boot) if readings else "-",
            str(len(readings)),
            f"{rates.get(node.device, 0.0):.1f}",
            show(0, "{:.2f}"),
            show(1, "{:.1f}"),
            show(2, "{:.2f}", 0.01),
            show(3, "{:.3f}"),
            show(4, "{:.1f}"),
            f"{link} ({view.connections if view else 0})",
        )
    return table


def run_demo(boards: int, workdir: Path) -> None:
    console = Console()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    shutil.rmtree(workdir, ignore_errors=True)  # fresh identities each run
    console.print("Starting the test receiver and", boards, "emulated ESP32 boards ...")
    with Receiver({}) as rx, Emulator(workdir) as emu:
        nodes = [
            launcher.provision(emu, rx.port, interval_ms=SAMPLING_MS, console_window_ms=500)
            for _ in range(boards)
        ]
        for node in nodes:
            rx.keys[node.key.device_id] = node.key
        launcher.write_key_file(workdir / "keys.json", nodes)
        for node in nodes:
            node.board.power_on()
        weather = threading.Thread(target=_weather, args=(nodes, stop), daemon=True)
        weather.start()
        console.print(
            f"Boards' serial ports: {', '.join(n.board.tty_path for n in nodes)}. "
            f"Device keys: {workdir / 'keys.json'}. Ctrl-C stops everything."
        )
        rates: dict[str, float] = {}
        counts = {n.device: 0 for n in nodes}
        last = time.monotonic()
        try:
            with Live(_view(nodes, rx, rates), console=console, refresh_per_second=4) as live:
                while not stop.wait(REFRESH_S):
                    now = time.monotonic()
                    for node in nodes:
                        count = rx.count(node.device)
                        rates[node.device] = (count - counts[node.device]) / (now - last)
                        counts[node.device] = count
                    last = now
                    live.update(Group(_view(nodes, rx, rates)))
        except KeyboardInterrupt:
            pass
        stop.set()
        weather.join(timeout=5)
        console.print("Stopping boards and receiver ...")
    console.print(f"Done: {sum(counts.values())} readings received; nothing left running.")
