"""`make demo`: the whole system on one machine, and a live view of it.

A private MQTT broker (Mosquitto when it is installed, else the embedded amqtt; the demo says
which); the fleet service with its console and MQTT ingest, on SQLite in the work folder; an
admin with a random password, printed with the console's URL; two sites, each enrolled through
the fleet's API by that admin, with a gateway that fetches its device keys from the fleet, and
emulated ESP32 boards that a technician registered there, running the real firmware with
sensors whose values drift. Ctrl-C (or SIGTERM) stops everything; nothing is left running.
"""

import shutil
import signal
import threading
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.live import Live

from kinhbac.demo.errors import DemoError

REFRESH_S = 0.5
# Vietnamese names as the console shows them; ASCII slugs, as MQTT topics need.
SITES = (("bac-ninh-water", "Bắc Ninh – trạm nước"),
         ("bac-ninh-air", "Bắc Ninh – trạm không khí"))

__all__ = ["DemoError", "run_demo"]


def split_boards(boards: int) -> list[int]:
    """Boards per site: the first site takes the odd one (5 -> 3 + 2)."""
    return [boards - boards // 2, boards // 2]


def run_demo(boards: int, workdir: Path, *, fleet_port: int | None = None,
             database_url: str | None = None) -> None:
    """Run until Ctrl-C or SIGTERM; a part that cannot start raises DemoError."""
    # Here, not at the top: the modules below import kinhbac.demo.errors, which runs this
    # package's __init__ first.
    from kinhbac.broker import LocalBroker
    from kinhbac.demo.fleet import DEFAULT_PORT, DemoFleet
    from kinhbac.demo.site import DemoSite, SitePlan, weather
    from kinhbac.demo.view import BrokerView, render
    from kinhbac.emulator.site import Emulator

    console = Console()
    stop = threading.Event()
    # SIGTERM as Ctrl-C: both end in the same stop below, whatever is starting at the time.
    # SIGINT too, explicitly: a shell starts a background job with it ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Resolved once, here: the default (run/demo) is relative to where `make demo` runs, and
    # the broker and the boards' interpreters are handed paths in it from other folders.
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)  # fresh identities, database and queues each run
    workdir.mkdir(parents=True)
    sites: list[DemoSite] = []
    with ExitStack() as running:
        try:
            broker = running.enter_context(LocalBroker(workdir / "broker"))
            broker_line = broker.describe()
            console.print(f"Broker: {broker_line}")
            emulator = running.enter_context(Emulator(workdir / "boards"))
            fleet = DemoFleet(workdir / "fleet", broker_port=broker.port, port=fleet_port,
                              database_url=database_url)
            running.callback(fleet.stop)
            console.print(f"Fleet: database {fleet.database}"
                          + ("" if database_url else " (no PostgreSQL asked for: "
                             "--database-url postgresql://... to use one)"))
            email, password = fleet.create_admin()
            fleet.start()
            admin = fleet.login(email, password)
            technician = fleet.technician(admin)
            console.print(f"Fleet: API and console on {fleet.url}"
                          + (f" ({DEFAULT_PORT} is taken)" if fleet.moved else "")
                          + ", its ingest reading the broker")
            for (slug, name), count in zip(SITES, split_boards(boards), strict=True):
                site = DemoSite(SitePlan(slug, name), fleet, emulator, workdir / slug,
                                (broker.host, broker.port))
                site.enrol(count, admin, technician)
                sites.append(site)
            for site in sites:  # stopped in the reverse order, as an ExitStack does
                running.callback(site.stop)
            for site in sites:
                site.start()
                assert site.gateway is not None
                console.print(f"Site {site.plan.slug}: gateway {site.gateway_name} "
                              f"(nodes on 127.0.0.1:{site.gateway.listener.port}), "
                              f"{len(site.nodes)} boards registered in the fleet")
            nodes = [node for site in sites for node in site.nodes]
            console.print(f"{len(nodes)} boards; serial ports: "
                          f"{', '.join(n.board.tty_path for n in nodes)}")
            # One item a line, so that no terminal width splits the password.
            console.print(f"Console: {fleet.url}/console", style="bold")
            console.print(f"  e-mail:   {email}", style="bold")
            console.print(f"  password: {password}", style="bold")
            view = BrokerView(broker.port, [slug for slug, _ in SITES])
            running.callback(view.close)
            weathering = threading.Thread(target=weather, args=(nodes, stop), daemon=True)
            weathering.start()
            running.callback(weathering.join, 5)
            running.callback(stop.set)
            header = (f"Console {fleet.url}/console ({email} / {password}); broker "
                      f"{broker_line}")
            with Live(render(sites, view, header), console=console,
                      refresh_per_second=4) as live:
                while not stop.wait(REFRESH_S):
                    live.update(render(sites, view, header))
        except KeyboardInterrupt:
            if not console.is_terminal:
                console.line()  # a piped Live leaves its last line open
        # A second Ctrl-C must not cut the stop short and leave boards or the broker running;
        # every step below has its own time limit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        console.print("Stopping the boards, the gateways, the fleet and the broker ...")
    console.print("Done; nothing left running.")
