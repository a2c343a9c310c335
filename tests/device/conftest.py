"""The technician's tools against real parts: the fleet service over HTTP (uvicorn on a thread,
SQLite, its MQTT ingest on a private broker), a real gateway process, emulated boards running
MicroPython. Everything in the fleet is set up through its API, as an admin would."""

import functools
from pathlib import Path
from typing import Any

import pytest
from helpers.fleet import FleetServer, running_fleet
from helpers.gateway import GatewayProcess

from kinhbac.emulator import launcher
from kinhbac.firmware import firmware_files

ADMIN = ("admin@example.org", "admin password 1")
TECHNICIAN = ("tech@example.org", "technician password 1")
VIEWER = ("viewer@example.org", "viewer password 1")
SITE = "testsite"  # the gateway helper's site
# Quick node timings, so that a board is heard within a second of booting.
NODE_SETTINGS = {
    "interval_ms": 50,
    "console_window_ms": 1500,  # a re-flash interrupts the app in it, as in the field
    "send_after_ms": 100,
    "ack_timeout_ms": 3000,
    "backoff_min_ms": 100,
    "backoff_max_ms": 1000,
    "good_after_ms": 600000,
}


class FleetSite:
    """What an admin sets up for a site: the site (WiFi of the emulated access point, the
    gateway's address), its gateway, and API tokens for a technician and a viewer."""

    def __init__(self, fleet: FleetServer, *, ssid: str, password: str, gateway_port: int,
                 slug: str = SITE) -> None:
        self.fleet = fleet
        self.admin = fleet.login(*ADMIN)
        self.site = fleet.call("POST", "/api/sites", self.admin, 201, json={
            "name": "Test site", "slug": slug, "wifi_ssid": ssid, "wifi_password": password,
            "gateway_host": "127.0.0.1", "gateway_port": gateway_port,
            "sensor_kit": launcher.SENSOR_KIT})
        self.site_id = self.site["id"]
        enrolled = fleet.call("POST", "/api/gateways", self.admin, 201,
                              json={"name": "gw1", "site_id": self.site_id})
        self.gateway_token = enrolled["token"]
        self.technician = self._api_token(*TECHNICIAN, role="technician")
        self.viewer = self._api_token(*VIEWER, role="viewer")

    def _api_token(self, email: str, password: str, role: str) -> str:
        user = self.fleet.call("POST", "/api/users", self.admin, 201, json={
            "email": email, "password": password, "role": role})
        return self.fleet.call("POST", "/api/tokens", self.admin, 201, json={
            "name": f"{role}'s laptop", "user_id": user["id"]})["token"]

    def devices(self) -> list[dict[str, Any]]:
        return self.fleet.call("GET", "/api/devices", self.admin,
                               params={"limit": 500})["items"]


@functools.cache
def firmware() -> dict[str, bytes]:
    return firmware_files()  # mpy-cross once per test run, not once per board


@pytest.fixture
def fleet(tmp_path, broker, monkeypatch):
    with running_fleet(tmp_path / "fleet", broker.port, monkeypatch, ADMIN) as server:
        yield server


@pytest.fixture
def gateway(tmp_path, broker, fleet):
    """A gateway process taking its keys from the fleet; started by the test (its token comes
    with the `site` fixture)."""
    gw = GatewayProcess(tmp_path / "gw", key_file=None, broker_port=broker.port,
                        fleet_url=fleet.url, key_refresh_s=1.0)
    yield gw
    gw.stop()


@pytest.fixture
def site(fleet, emulator, gateway, monkeypatch):
    found = FleetSite(fleet, ssid=emulator.access_point.ssid,
                      password=emulator.access_point.password, gateway_port=gateway.port)
    monkeypatch.setenv("KINHBAC_GATEWAY_FLEET_TOKEN", found.gateway_token)
    return found


@pytest.fixture(autouse=True)
def sites_dir(tmp_path, monkeypatch) -> Path:
    """Site profiles kept in the test's folder, never the user's (for every test here)."""
    folder = tmp_path / "laptop" / "sites"
    monkeypatch.setenv("KINHBAC_SITES_DIR", str(folder))
    return folder
