"""Over-the-air updates with every real part (issue 13): the fleet service with its MQTT ingest
(counting what gateways fetch of releases), a private Mosquitto, the gateway as a process that
fetches keys and update assignments from the fleet, and emulated ESP32 boards running the real
firmware, each registered in the fleet as a technician would. Releases are uploaded and
rollouts started through the fleet's API, as an admin would. Shared by tests/test_ota_rollout.py
and bench/ota_bench.py."""

import functools
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from argon2 import PasswordHasher

from helpers.fleet import FleetServer, wait_until
from helpers.gateway import Collector, GatewayProcess
from kinhbac import wire
from kinhbac.emulator import launcher
from kinhbac.fleet import security
from kinhbac.fleet.app import create_app
from kinhbac.fleet.settings import load_settings
from kinhbac.firmware import FIRMWARE_DIR, bundle_files, config_file, firmware_files

ADMIN = ("admin@example.org", "admin password 1")
TECHNICIAN = ("tech@example.org", "technician password 1")
SITE = "testsite"
REFRESH_S = 1.0  # the gateway's key listing, and its update assignments with it
ROLLOUT_TICK_S = 1.0  # the fleet's periodic rules (deadlines); 10 s in production
# The fast tests' node settings (tests/test_gateway_fleet_keys.py), and a trial of 10 s (the
# least the firmware takes): a release that never confirms is reset three times and rolled
# back within about half a minute instead of half an hour.
NODE_SETTINGS = {
    "interval_ms": 50,
    "console_window_ms": 100,
    "send_after_ms": 100,
    "ack_timeout_ms": 3000,
    "backoff_min_ms": 100,
    "backoff_max_ms": 1000,
    "good_after_ms": 600000,
    "ota_trial_s": 10,
}
FINAL = frozenset({"confirmed", "failed", "rolled_back", "timed_out", "cancelled"})
RELEASE_FILES = "/api/gateway/releases/"  # what a gateway fetches of a release
CACHED = 'kinhbac_gateway_ota_releases_total{outcome="cached"}'
REFUSED = 'kinhbac_gateway_ota_releases_total{outcome="refused"}'

# Releases that install fine and fail in use, as docs/ota.md's faults table lists them: each a
# change to one firmware source, (old text, new text).
RAISES_AT_IMPORT = {"node/app.py": (
    '\nVERSION = "', '\nraise RuntimeError("this release is broken at import")\nVERSION = "')}
WRONG_GATEWAY_PORT = {"node/net.py": (
    'self.port = gw["port"]', 'self.port = 9  # this release dials a port nothing listens on')}
SENSORS_FAIL = {"node/sensors.py": (
    '        self.valid = False\n        if not self.ready:',
    '        self.valid = False\n        raise OSError(5, "this release breaks the BME280 read")'
    '\n        if not self.ready:')}


@functools.cache
def base_firmware() -> dict[str, bytes]:
    return firmware_files()  # mpy-cross once per run, not once per board


def firmware_variant(workdir: Path, version: str,
                     changes: dict[str, tuple[str, str]] | None = None) -> dict[str, bytes]:
    """A bundle of this firmware (kinhbac.firmware.bundle_files) whose app says `version`,
    with each of `changes` applied to its source: {relative path: (old text, new text)}."""
    tree = workdir / f"firmware-{version}"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(FIRMWARE_DIR, tree, ignore=shutil.ignore_patterns("__pycache__"))
    app = tree / "node" / "app.py"
    source, found = re.subn(r'^VERSION = "[^"]+"', f'VERSION = "{version}"', app.read_text(),
                            flags=re.MULTILINE)
    if found != 1:
        raise ValueError(f"{app}: no VERSION line to set; the firmware changed")
    app.write_text(source)
    for path, (old, new) in (changes or {}).items():
        source = (tree / path).read_text()
        if source.count(old) != 1:
            raise ValueError(f"{path}: {old!r} is not there exactly once; the firmware changed")
        (tree / path).write_text(source.replace(old, new))
    return bundle_files(tree)


# ----- the fleet, counting what gateways fetch -----


class ReleaseFetches:
    """Requests and body bytes the fleet answered under /api/gateway/releases/."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.body_bytes = 0

    def wrap(self, app: Any) -> Any:
        async def counted(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http" or not scope["path"].startswith(RELEASE_FILES):
                return await app(scope, receive, send)

            async def counting_send(message: dict) -> None:
                if message["type"] == "http.response.body":
                    with self.lock:
                        self.body_bytes += len(message.get("body", b""))
                await send(message)

            with self.lock:
                self.requests.append(scope["path"])
            return await app(scope, receive, counting_send)

        return counted

    def files(self) -> list[str]:
        with self.lock:
            return [p for p in self.requests if "/files/" in p]


class CountingFleet(FleetServer):
    """The fleet service, its rules run every ROLLOUT_TICK_S, what gateways fetch of releases
    counted at the fleet itself (no proxy in the way)."""

    def __init__(self, workdir: Path, broker_port: int | None,
                 database_url: str | None = None) -> None:
        super().__init__(workdir, broker_port, database_url)
        self.fetches = ReleaseFetches()
        self.workdir = workdir
        self.data_dir = workdir / "data"  # the default: beside fleet.toml

    def start(self, timeout: float = 30.0) -> None:
        app = create_app(load_settings(self.config))
        app.state.rollout_tick_s = ROLLOUT_TICK_S
        self.server = uvicorn.Server(uvicorn.Config(self.fetches.wrap(app), host="127.0.0.1",
                                                    port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="fleet", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout, "the fleet serving")

    def stored_file(self, sha256: str) -> Path:
        """Where the fleet keeps a release file (docs/ota.md, "Where the files are kept")."""
        return self.data_dir / "releases" / "sha256" / sha256[:2] / sha256


@contextmanager
def counting_fleet(workdir: Path, broker_port: int, monkeypatch,
                   database_url: str | None = None) -> Iterator[CountingFleet]:
    """A started CountingFleet with one admin; Argon2id at its cheapest as in tests/fleet.
    `database_url`: an empty database (None: SQLite in `workdir`)."""
    monkeypatch.setattr(security, "_hasher",
                        PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    server = CountingFleet(workdir, broker_port, database_url)
    server.create_admin(*ADMIN)
    server.start()
    try:
        yield server
    finally:
        server.close()


# ----- a site: its gateway and boards -----


def enrol_site(fleet: FleetServer) -> tuple[str, str, str, str]:
    """The test site set up as an admin and a technician would: the admin's token, the site's
    id, its one gateway's token and the technician's token."""
    admin = fleet.login(*ADMIN)
    site_id = fleet.call("POST", "/api/sites", admin, 201, json={
        "name": "Test site", "slug": SITE, "sensor_kit": launcher.SENSOR_KIT})["id"]
    gateway_token = fleet.call("POST", "/api/gateways", admin, 201,
                               json={"name": "gw1", "site_id": site_id})["token"]
    fleet.call("POST", "/api/users", admin, 201, json={
        "email": TECHNICIAN[0], "password": TECHNICIAN[1], "role": "technician"})
    return admin, site_id, gateway_token, fleet.login(*TECHNICIAN)


class OtaSite:
    """A site set up through the fleet's API (site, enrolled gateway, technician), its gateway
    process, and its boards registered by MAC and flashed with the identity the fleet issued."""

    def __init__(self, workdir: Path, fleet: CountingFleet, emulator, broker_port: int,
                 **gateway_settings: Any) -> None:
        self.workdir = workdir
        self.fleet = fleet
        self.emulator = emulator
        self.admin, self.site_id, self.gateway_token, self.technician = enrol_site(fleet)
        self.gateway = GatewayProcess(workdir / "gw", key_file=None, broker_port=broker_port,
                                      fleet_url=fleet.url, fleet_token=self.gateway_token,
                                      key_refresh_s=REFRESH_S, **gateway_settings)
        self.nodes: list[launcher.Node] = []
        self.device_ids: dict[str, str] = {}  # wire id -> the fleet's device id

    def add_nodes(self, count: int, **settings: Any) -> list[launcher.Node]:
        """`count` boards registered in the fleet and flashed; off."""
        added = []
        for _ in range(count):
            board = self.emulator.add_board()
            device = self.fleet.call("POST", "/api/devices", self.technician, 201,
                                     json={"mac": board.mac.hex(":"), "site_id": self.site_id})
            secret = bytes.fromhex(device["secret"])
            key = wire.Key(bytes.fromhex(device["wire_id"]), device["key_id"], secret)
            node = launcher.wired_node(board, key, secret)
            config = launcher.node_config(node, self.gateway.port, self.emulator,
                                          **(NODE_SETTINGS | settings))
            board.write_files(base_firmware() | config_file(config))
            self.device_ids[node.device] = device["id"]
            added.append(node)
        self.nodes += added
        return added

    def start(self, nodes: list[launcher.Node] | None = None) -> None:
        """The gateway, then the boards (all of them unless said)."""
        self.gateway.start()
        for node in self.nodes if nodes is None else nodes:
            node.board.power_on()

    def close(self) -> None:
        self.gateway.stop()

    def wait_cached(self, releases: int = 1, timeout: float = 30.0) -> None:
        """The gateway has fetched and checked `releases` releases: offers follow HELLOs."""
        wait_until(lambda: self.gateway.metrics().get(CACHED, 0) >= releases, timeout,
                   f"{releases} release(s) in the gateway's cache")

    # ----- releases and rollouts, as an admin -----

    def upload(self, kind: str, version: str, files: dict[str, bytes]) -> dict:
        """POST /api/releases: kind and version first, then one `file` part per file."""
        answer = self.fleet.http.post(
            "/api/releases", headers={"Authorization": f"Bearer {self.admin}"},
            data={"kind": kind, "version": version},
            files=[("file", (path, data, "application/octet-stream"))
                   for path, data in files.items()], timeout=60)
        assert answer.status_code == 201, answer.text
        return answer.json()

    def start_rollout(self, release: dict, waves: list[int], *,
                      devices: list[launcher.Node] | None = None, **options: Any) -> dict:
        """A rollout of `release` to the site (or to `devices`)."""
        target = ({"site": SITE} if devices is None
                  else {"devices": [n.device for n in devices]})
        return self.fleet.call("POST", "/api/rollouts", self.admin, 201, json={
            "release_id": release["id"], "target": target, "waves": waves, **options})

    def rollout(self, rollout_id: str) -> dict:
        return self.fleet.call("GET", f"/api/rollouts/{rollout_id}", self.admin)

    def devices(self, rollout_id: str) -> dict[str, dict]:
        """The rollout's device records by wire id."""
        rows = self.fleet.call("GET", f"/api/rollouts/{rollout_id}/devices", self.admin,
                               params={"limit": 500})["items"]
        return {row["device_id"]: row for row in rows}

    def events(self, rollout_id: str, device: str) -> list[dict]:
        return self.fleet.call("GET", f"/api/rollouts/{rollout_id}/events", self.admin,
                               params={"device": device, "limit": 500})["items"]

    def states(self, rollout_id: str) -> dict[str, str]:
        return {d: row["state"] for d, row in self.devices(rollout_id).items()}

    def wait_states(self, rollout_id: str, want: Callable[[dict[str, str]], bool],
                    timeout: float, what: str) -> dict[str, str]:
        """Poll the rollout's device states until `want(states)`; fail naming where each is."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(rollout_id)
            if want(states):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s; states: "
                                     f"{summary(states)}\n{self.diagnosis(rollout_id, states)}")
            time.sleep(0.25)

    def wait_all(self, rollout_id: str, state: str, timeout: float,
                 nodes: list[launcher.Node] | None = None) -> dict[str, str]:
        names = {n.device for n in (self.nodes if nodes is None else nodes)}

        def reached(states: dict[str, str]) -> bool:
            if all(states.get(d) == state for d in names):
                return True
            # Final states do not change: no use waiting out the timeout.
            assert not all(states.get(d) in FINAL for d in names), (
                f"{len(names)} devices {state}: they ended {summary(states)}\n"
                f"{self.diagnosis(rollout_id, states, everyone=True)}")
            return False

        return self.wait_states(rollout_id, reached, timeout, f"{len(names)} devices {state}")

    def firmware_version(self, node: launcher.Node) -> str | None:
        """The version the fleet holds for the device, from its last HELLO."""
        return self.fleet.call("GET", f"/api/devices/{self.device_ids[node.device]}",
                               self.technician)["firmware_version"]

    def diagnosis(self, rollout_id: str, states: dict[str, str], everyone: bool = False) -> str:
        """For a failure message: the last events and console lines of each device that is not
        confirmed (or of every device), and the gateway's update log lines."""
        lines = []
        by_id = {n.device: n for n in self.nodes}
        for device, state in sorted(states.items()):
            if state == "confirmed" and not everyone:
                continue
            events = self.events(rollout_id, device)[-3:]
            lines.append(f"{device} {state}: " + "; ".join(
                f"{e['from_state']}->{e['to_state']} {e['reason'] or ''}".strip()
                for e in events))
            node = by_id.get(device)
            if node is not None:
                tail = node.board.console.text().splitlines()[-6:]
                lines += [f"    {line}" for line in tail]
            if len(lines) > 60:
                break
        gateway_tail = [line for line in self.gateway.log().splitlines()
                        if "ota" in line.lower() or "release" in line.lower()][-10:]
        return "\n".join(lines + ["gateway:"] + [f"    {line}" for line in gateway_tail])


def summary(states: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for state in states.values():
        counts[state] += 1
    return dict(counts)


# ----- readings -----


def gaps(collector: Collector, device: str) -> dict[int, list[int]]:
    """Per boot, the seqs missing below its highest one: a reading taken and never delivered.
    (What a power cut takes from RAM after the last one delivered is past the highest seq and
    cannot show here.)"""
    with collector.lock:
        keys = list(collector.readings[device])
    by_boot: dict[int, set[int]] = defaultdict(set)
    for boot, seq in keys:
        by_boot[boot].add(seq)
    missing = {}
    for boot, seqs in sorted(by_boot.items()):
        holes = sorted(set(range(1, max(seqs) + 1)) - seqs)
        if holes:
            missing[boot] = holes[:10]
    return missing


def boots_seen(collector: Collector, device: str) -> list[int]:
    with collector.lock:
        return sorted({boot for boot, _ in collector.readings[device]})


def assert_nothing_lost(collector: Collector, nodes: list[launcher.Node]) -> None:
    lost = {node.device: found for node in nodes if (found := gaps(collector, node.device))}
    assert not lost, f"readings missing (device: boot: first missing seqs): {lost}"


def wait_flowing(collector: Collector, nodes: list[launcher.Node], more: int,
                 timeout: float, what: str) -> None:
    """Every node delivers `more` readings from now."""
    before = {n.device: collector.count(n.device) for n in nodes}
    collector.wait_for(lambda: all(collector.count(n.device) >= before[n.device] + more
                                   for n in nodes), timeout=timeout, what=what)


class ReadingsWatch:
    """Checks, while a rollout runs, that every node keeps delivering: the longest stretch in
    which a node delivered nothing, per node."""

    def __init__(self, collector: Collector, nodes: list[launcher.Node],
                 period_s: float = 0.5) -> None:
        self.collector = collector
        self.nodes = nodes
        self.period_s = period_s
        self.longest_silence: dict[str, float] = {n.device: 0.0 for n in nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = {n.device: (self.collector.count(n.device), time.monotonic()) for n in self.nodes}
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            for n in self.nodes:
                count = self.collector.count(n.device)
                seen, since = last[n.device]
                if count > seen:
                    last[n.device] = (count, now)
                else:
                    self.longest_silence[n.device] = max(self.longest_silence[n.device],
                                                         now - since)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        return self.longest_silence
