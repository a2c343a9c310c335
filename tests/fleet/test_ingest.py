"""MQTT ingest, against a private mosquitto and both databases: device and gateway statuses,
offline after a silence, the bounded window of readings, duplicates, malformed messages.

Payloads are built in the shapes docs/mqtt.md shows (the gateway's), with generated values.
Each test reads its own topic prefix, so the module's broker carries no state between them.
"""

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.certs import make_tls_material
from pydantic import SecretStr
from sqlmodel import Session, func, select

from kinhbac.broker import BrokerUnavailable, LocalBroker, TlsFiles
from kinhbac.fleet import ingest
from kinhbac.fleet.app import create_app
from kinhbac.fleet.ingest import Batch, IngestWorker, subscriptions
from kinhbac.fleet.models import DeviceStatus, GatewayStatus, RecentReading
from kinhbac.fleet.settings import Settings, SettingsError, load_settings

from .utils import SECRET_KEY, bearer, make_device, make_site, make_user

WAIT_S = 10.0
ACL_EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl.example"
SENSORS = [("temperature", "C"), ("humidity", "%RH"), ("pressure", "Pa")]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def now_ms() -> int:
    return int(time.time() * 1000)


def random_wire_id() -> str:
    return os.urandom(8).hex()


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path_factory.mktemp("broker")) as broker:
        yield broker


@dataclass
class SiteGateway:
    """Publishes what a site gateway publishes (docs/mqtt.md), through a paho client."""

    client: mqtt.Client
    prefix: str
    site: str = "site-a"
    name: str = "pi-01"
    published: int = 0
    ts_base: int = field(default_factory=now_ms)

    def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> None:
        info = self.client.publish(f"{self.prefix}/{topic}", payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        self.published += 1

    def telemetry(self, device: str, boot: int, seqs: range, *, replayed: bool = False,
                  value: float = 21.5) -> None:
        readings = []
        for seq in seqs:
            sensor, unit = SENSORS[(seq - 1) % len(SENSORS)]
            readings.append({"seq": seq, "sensor": sensor, "value": value + seq / 8, "unit": unit,
                             "ts": self.ts_base + seq * 1000, "pre_sync": False})
        payload = {"device": device, "site": self.site, "gateway": self.name, "boot": boot,
                   "seq": seqs[0], "replayed": replayed, "readings": readings}
        self.publish(f"{self.site}/{device}/telemetry", json.dumps(payload, separators=(",", ":")))

    def status(self, device: str, *, last_seen_ms: int | None = None, firmware: str = "0.1.0",
               boot: int = 8, buffer_full: int = 12,
               sensor_failures: dict[str, Any] | None = None, **later: Any) -> None:
        payload = {
            "device": device, "site": self.site, "gateway": self.name,
            "last_seen_ms": now_ms() if last_seen_ms is None else last_seen_ms,
            "firmware": firmware, "boot": boot, "reset_cause": "WATCHDOG",
            "drops": {"buffer_full": buffer_full, "storage_error": 0, "sensor_error": 1},
            "sensors": [{"name": name, "unit": unit} for name, unit in SENSORS],
        }
        if sensor_failures is not None:  # a node that counts its failures per sensor
            payload["sensor_failures"] = sensor_failures
        payload.update(later)  # fields a later gateway adds (free_flash_bytes)
        self.publish(f"{self.site}/{device}/status", json.dumps(payload), retain=True)

    def gateway_status(self, state: str, **fields: Any) -> None:
        payload = {"state": state, "gateway": self.name, **fields}
        self.publish(f"{self.site}/gateway/{self.name}/status", json.dumps(payload), retain=True)


@dataclass
class Fleet:
    client: TestClient
    worker: IngestWorker
    gateway: SiteGateway

    def settled(self, *others: "Fleet") -> None:
        """Wait until every published message was written or skipped."""
        workers = (self.worker, *(other.worker for other in others))

        def done() -> bool:
            handled = sum(w.stats.written + w.stats.malformed + w.stats.ignored for w in workers)
            return handled >= self.gateway.published

        wait_until(done, f"{self.gateway.published} messages to be ingested")


@pytest.fixture
def publisher(broker) -> Iterator[mqtt.Client]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"gw-{uuid.uuid4().hex}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    yield client
    client.disconnect()  # first: it wakes the network thread, which loop_stop() then joins
    client.loop_stop()


def ingest_settings(app: FastAPI, broker: LocalBroker, **overrides: Any) -> Settings:
    return app.state.settings.model_copy(update={
        "ingest_enabled": True, "mqtt_host": broker.host, "mqtt_port": broker.port,
        "mqtt_topic_prefix": f"kb-{uuid.uuid4().hex[:8]}",
        "mqtt_client_id": f"fleet-{uuid.uuid4().hex[:8]}", "ingest_batch_interval_s": 0.02,
        **overrides,
    })


@contextmanager
def running_fleet(settings: Settings, publisher: mqtt.Client) -> Iterator[Fleet]:
    """The fleet app with its ingest running (the lifespan task `kinhbac fleet serve` runs)."""
    app = create_app(settings, prepare=False)
    try:
        with TestClient(app) as client:
            worker = app.state.ingest
            wait_until(worker.subscribed.is_set, "the ingest to subscribe")
            yield Fleet(client, worker, SiteGateway(publisher, settings.mqtt_topic_prefix))
    finally:
        app.state.engine.dispose()


@pytest.fixture
def fleet(app, broker, publisher, session) -> Iterator[Fleet]:
    with running_fleet(ingest_settings(app, broker, ingest_readings_per_device=5), publisher) as f:
        yield f


@pytest.fixture
def viewer(session) -> dict[str, str]:
    from kinhbac.fleet.models import Role

    _, token = make_user(session, Role.viewer)
    return bearer(token)


def api_device(fleet: Fleet, viewer, device_id) -> dict[str, Any]:
    response = fleet.client.get(f"/api/devices/{device_id}", headers=viewer)
    assert response.status_code == 200, response.text
    return response.json()


def api_readings(fleet: Fleet, viewer, device_id, **params) -> list[tuple[int, int]]:
    response = fleet.client.get(f"/api/devices/{device_id}/readings", headers=viewer,
                                params=params)
    assert response.status_code == 200, response.text
    return [(r["boot"], r["seq"]) for r in response.json()]


def stored_keys(session: Session, wire_id: str) -> list[tuple[int, int]]:
    session.expire_all()
    rows = session.exec(select(RecentReading).where(RecentReading.wire_id == wire_id)).all()
    return sorted(((r.boot, r.seq) for r in rows), reverse=True)


# ---- device status


def test_status_updates_a_registered_device_and_records_an_unknown_one(fleet, session, box,
                                                                        viewer):
    site = make_site(session, box, slug=f"s-{uuid.uuid4().hex[:6]}")
    device = make_device(session, box, site, firmware_version="0.0.1")
    fleet.gateway.site = site.slug  # the device's own site's gateway
    unknown = random_wire_id()
    seen = now_ms() - 2000
    fleet.gateway.status(device.wire_id, last_seen_ms=seen, firmware="0.1.0", boot=8)
    fleet.gateway.status(unknown, firmware="9.9.9")
    fleet.settled()

    shown = api_device(fleet, viewer, device.id)
    assert (shown["firmware_version"], shown["boot_counter"]) == ("0.1.0", 8)
    assert datetime.fromisoformat(shown["last_seen_at"]) == datetime.fromtimestamp(seen / 1000, UTC)
    assert shown["online"] is True
    status = shown["status"]
    assert (status["site"], status["gateway"], status["reset_cause"]) == (site.slug, "pi-01",
                                                                          "WATCHDOG")
    assert status["drops"] == {"buffer_full": 12, "storage_error": 0, "sensor_error": 1}
    assert [s["name"] for s in status["sensors"]] == ["temperature", "humidity", "pressure"]

    session.expire_all()
    seen_unknown = session.get(DeviceStatus, unknown)
    assert seen_unknown is not None and seen_unknown.firmware == "9.9.9"
    listed = fleet.client.get("/api/devices", headers=viewer).json()
    assert unknown not in [d["wire_id"] for d in listed["items"]]  # seen, not registered

    # An older status (a redelivery, or another instance's late write) changes nothing.
    fleet.gateway.status(device.wire_id, last_seen_ms=seen - 60_000, firmware="0.0.9",
                         buffer_full=0)
    fleet.settled()
    again = api_device(fleet, viewer, device.id)
    assert again["firmware_version"] == "0.1.0"
    assert again["status"]["drops"]["buffer_full"] == 12


def test_device_detail_shows_each_sensors_failure_counts_from_its_last_status(
        fleet, session, box, viewer):
    site = make_site(session, box, slug=f"s-{uuid.uuid4().hex[:6]}")
    device = make_device(session, box, site)
    fleet.gateway.site = site.slug
    unplugged = {"temperature": {"sensor_error": 41, "out_of_range": 0},
                 "humidity": {"sensor_error": 41, "out_of_range": 0},
                 "pressure": {"sensor_error": 41, "out_of_range": 2}}
    fleet.gateway.status(device.wire_id, last_seen_ms=now_ms() - 3000,
                         sensor_failures=unplugged)
    fleet.settled()
    assert api_device(fleet, viewer, device.id)["status"]["sensor_failures"] == unplugged

    # A node whose firmware does not count per sensor (or a status before it did): none shown,
    # rather than counts of zero it never reported.
    fleet.gateway.status(device.wire_id, last_seen_ms=now_ms() - 2000)
    fleet.settled()
    assert api_device(fleet, viewer, device.id)["status"]["sensor_failures"] is None

    # A status with a count no node sends is refused whole; the stored one stays.
    fleet.gateway.status(device.wire_id, sensor_failures={"temperature": {"sensor_error": -1,
                                                                          "out_of_range": 0}})
    fleet.settled()
    assert fleet.worker.stats.malformed == 1
    assert api_device(fleet, viewer, device.id)["status"]["sensor_failures"] is None


def test_device_keeps_the_last_free_flash_it_reported_and_when_until_another_comes(
        fleet, session, box, viewer):
    site = make_site(session, box, slug=f"s-{uuid.uuid4().hex[:6]}")
    device = make_device(session, box, site)
    fleet.gateway.site = site.slug
    assert api_device(fleet, viewer, device.id)["free_flash_bytes"] is None
    heard = now_ms() - 5000
    fleet.gateway.status(device.wire_id, last_seen_ms=heard, free_flash_bytes=413_696)
    fleet.settled()
    shown = api_device(fleet, viewer, device.id)
    assert shown["free_flash_bytes"] == 413_696
    assert datetime.fromisoformat(shown["free_flash_at"]) == \
        datetime.fromtimestamp(heard / 1000, UTC)

    # A later status without a figure (a node in safe mode, an older gateway): kept, with its
    # time; a later figure replaces it; an older one, heard late, does not.
    fleet.gateway.status(device.wire_id, last_seen_ms=heard + 1000, free_flash_bytes=None)
    fleet.gateway.status(device.wire_id, last_seen_ms=heard + 2000)
    fleet.settled()
    shown = api_device(fleet, viewer, device.id)
    assert (shown["free_flash_bytes"], shown["status"]["boot"]) == (413_696, 8)
    assert datetime.fromisoformat(shown["free_flash_at"]) == \
        datetime.fromtimestamp(heard / 1000, UTC)
    fleet.gateway.status(device.wire_id, last_seen_ms=heard + 3000, free_flash_bytes=0)
    fleet.gateway.status(device.wire_id, last_seen_ms=heard - 1000, free_flash_bytes=999_999)
    fleet.settled()
    assert api_device(fleet, viewer, device.id)["free_flash_bytes"] == 0

    # A figure no node can send is refused with the whole status; the kept one stays.
    for figure in (-1, 2**32, "4096"):
        fleet.gateway.status(device.wire_id, last_seen_ms=heard + 4000, free_flash_bytes=figure)
    fleet.settled()
    assert fleet.worker.stats.malformed == 3
    assert api_device(fleet, viewer, device.id)["free_flash_bytes"] == 0


def test_a_batch_keeps_a_free_flash_figure_that_a_later_status_without_one_follows():
    at = datetime(2026, 12, 6, tzinfo=UTC)
    batch = Batch(window=3)
    batch.add_status({"wire_id": "d1", "last_seen_at": at, "free_flash_bytes": 8192,
                      "free_flash_at": at})
    batch.add_status({"wire_id": "d1", "last_seen_at": at + timedelta(seconds=1),
                      "free_flash_bytes": None, "free_flash_at": None, "firmware": "safe"})
    assert (batch.statuses["d1"]["firmware"], batch.statuses["d1"]["free_flash_bytes"],
            batch.statuses["d1"]["free_flash_at"]) == ("safe", 8192, at)
    # The same two the other way round (a write that failed, merged back under newer ones).
    batch = Batch(window=3)
    batch.add_status({"wire_id": "d1", "last_seen_at": at + timedelta(seconds=1),
                      "free_flash_bytes": None, "free_flash_at": None, "firmware": "safe"})
    batch.add_status({"wire_id": "d1", "last_seen_at": at, "free_flash_bytes": 8192,
                      "free_flash_at": at})
    assert (batch.statuses["d1"]["firmware"], batch.statuses["d1"]["free_flash_bytes"]) == \
        ("safe", 8192)


def test_device_goes_offline_after_the_configured_silence(app, broker, publisher, session, box,
                                                          viewer):
    silence = 1.5
    settings = ingest_settings(app, broker, ingest_offline_after_s=silence)
    site = make_site(session, box)
    fresh, silent, clock_ahead = (make_device(session, box, site) for _ in range(3))
    with running_fleet(settings, publisher) as fleet:
        fleet.gateway.site = site.slug
        heard = time.monotonic()
        fleet.gateway.status(fresh.wire_id)
        fleet.gateway.status(silent.wire_id, last_seen_ms=now_ms() - 10_000)
        # A gateway clock an hour ahead: the silence counts from when the fleet heard it.
        fleet.gateway.status(clock_ahead.wire_id, last_seen_ms=now_ms() + 3_600_000)
        fleet.settled()
        online = {d.wire_id: api_device(fleet, viewer, d.id)["online"]
                  for d in (fresh, silent, clock_ahead)}
        assert time.monotonic() - heard < silence, "too slow to see the devices online"
        assert online == {fresh.wire_id: True, silent.wire_id: False, clock_ahead.wire_id: True}

        time.sleep(max(0.0, heard + silence + 0.1 - time.monotonic()))
        assert not api_device(fleet, viewer, fresh.id)["online"]
        assert not api_device(fleet, viewer, clock_ahead.id)["online"]
        never = make_device(session, box, site)
        shown = api_device(fleet, viewer, never.id)
        assert (shown["online"], shown["status"]) == (False, None)


def test_another_sites_account_cannot_rewrite_a_device_or_push_out_its_readings(
        fleet, session, box, viewer):
    """Site B's gateway account may publish under kinhbac/site-b/# only, but it can name any
    device id there: a device registered at site A is believed only under site A's topics, and
    a boot counter far ahead of its last is refused whatever the topic."""
    home = make_site(session, box)
    device = make_device(session, box, home)
    fleet.gateway.site = home.slug
    fleet.gateway.status(device.wire_id, firmware="1.0.0", boot=8)
    fleet.gateway.telemetry(device.wire_id, 8, range(1, 6))
    fleet.settled()

    fleet.gateway.site = make_site(session, box).slug  # the attacker's own site
    fleet.gateway.status(device.wire_id, firmware="6.6.6", boot=9)
    fleet.gateway.telemetry(device.wire_id, 9, range(1, 41), value=-99.0)
    fleet.settled()
    shown = api_device(fleet, viewer, device.id)
    assert (shown["firmware_version"], shown["boot_counter"]) == ("1.0.0", 8)
    assert shown["status"]["site"] == home.slug
    assert api_readings(fleet, viewer, device.id) == [(8, s) for s in (5, 4, 3, 2, 1)]
    assert fleet.worker.stats.refused_site >= 2  # rows: the status, the readings the batch kept

    # Under its own site's topics, a boot counter two billion ahead is refused too: it would
    # freeze out every later status of the real node.
    fleet.gateway.site = home.slug
    fleet.gateway.status(device.wire_id, firmware="6.6.6", boot=2**31)
    fleet.settled()
    assert api_device(fleet, viewer, device.id)["boot_counter"] == 8
    assert fleet.worker.stats.refused_boot == 1
    fleet.gateway.status(device.wire_id, firmware="1.0.1", boot=9)  # the real node reboots
    fleet.settled()
    assert api_device(fleet, viewer, device.id)["firmware_version"] == "1.0.1"


# ---- gateway status
# ---- gateway status


def test_gateway_status_keeps_state_and_drops_through_the_last_will(fleet, session):
    since = now_ms() - 5000
    fleet.gateway.gateway_status("online", since_ms=since, dropped={})
    fleet.gateway.gateway_status("online", since_ms=since, dropped={"disk_cap": 5377})
    fleet.settled()
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert (row.state, row.dropped) == ("online", {"disk_cap": 5377})
    assert row.since_at == datetime.fromtimestamp(since / 1000, UTC)

    fleet.gateway.gateway_status("offline")  # the last will: no since_ms, no dropped
    fleet.settled()
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert (row.state, row.dropped) == ("offline", {"disk_cap": 5377})

    # A status of an older session arriving late does not undo the newer one.
    fleet.gateway.gateway_status("online", since_ms=since + 60_000, dropped={})
    fleet.gateway.gateway_status("offline", since_ms=since, dropped={"disk_cap": 1})
    fleet.settled()
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert (row.state, row.dropped) == ("online", {})


def test_gateway_status_stores_the_queue_figures_it_reports_and_keeps_them_through_the_will(
        fleet, session):
    since = now_ms() - 60_000
    oldest = since + 1234
    fleet.gateway.gateway_status("online", since_ms=since, dropped={}, queue_depth=1200,
                                 oldest_queued_ms=oldest)
    fleet.settled()
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert row.queue_depth == 1200
    assert row.oldest_queued_at == datetime.fromtimestamp(oldest / 1000, UTC)

    # The last will says nothing of the queue: the last figures stay (still on its disk).
    fleet.gateway.gateway_status("offline")
    fleet.settled()
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert (row.state, row.queue_depth) == ("offline", 1200)

    # Drained: depth 0 and no oldest reading.
    fleet.gateway.gateway_status("online", since_ms=since + 5000, dropped={}, queue_depth=0,
                                 oldest_queued_ms=None)
    fleet.settled()
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert (row.state, row.queue_depth, row.oldest_queued_at) == ("online", 0, None)

    # A gateway before the figures (a downgrade): not reported, not an empty queue.
    fleet.gateway.gateway_status("online", since_ms=since + 10_000, dropped={})
    fleet.settled()
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert (row.queue_depth, row.oldest_queued_at) == (None, None)


@pytest.mark.parametrize("figures", [
    {"queue_depth": -5, "oldest_queued_ms": 1},
    {"queue_depth": 10**15, "oldest_queued_ms": 1},
    {"queue_depth": 5, "oldest_queued_ms": 10**17},
    {"queue_depth": 0, "oldest_queued_ms": 1},
])
def test_a_forged_gateway_status_with_impossible_queue_figures_is_refused_whole(
        fleet, session, figures):
    since = now_ms() - 60_000
    fleet.gateway.gateway_status("online", since_ms=since, dropped={}, queue_depth=7,
                                 oldest_queued_ms=since)
    fleet.gateway.gateway_status("online", since_ms=since + 1, dropped={}, **figures)
    fleet.settled()
    assert fleet.worker.stats.malformed == 1
    session.expire_all()
    row = session.get(GatewayStatus, ("site-a", "pi-01"))
    assert (row.queue_depth, row.since_at) == (7, datetime.fromtimestamp(since / 1000, UTC))


# ---- recent readings


def test_readings_window_keeps_the_newest_n_per_device(fleet, session, box, viewer):
    site = make_site(session, box)
    device = make_device(session, box, site)
    fleet.gateway.site = site.slug
    wire_id = device.wire_id
    for first in (1, 5, 9):  # one transaction each: the database's prune, not only the batch's
        fleet.gateway.telemetry(wire_id, 7, range(first, first + 4))
        fleet.settled()
        assert len(stored_keys(session, wire_id)) == min(5, first + 3)
    assert api_readings(fleet, viewer, device.id) == [(7, s) for s in (12, 11, 10, 9, 8)]

    fleet.gateway.telemetry(wire_id, 8, range(1, 3))  # a reboot: seq starts again
    fleet.settled()
    expected = [(8, 2), (8, 1), (7, 12), (7, 11), (7, 10)]
    assert api_readings(fleet, viewer, device.id) == expected
    assert api_readings(fleet, viewer, device.id, limit=2) == expected[:2]

    # One message much larger than the window, and old readings arriving late.
    fleet.gateway.telemetry(wire_id, 9, range(1, 41))
    fleet.gateway.telemetry(wire_id, 7, range(1, 4), replayed=True)
    fleet.settled()
    assert stored_keys(session, wire_id) == [(9, s) for s in range(40, 35, -1)]
    body = fleet.client.get(f"/api/devices/{device.id}/readings", headers=viewer).json()
    assert body[0] == {"boot": 9, "seq": 40, "sensor": "temperature", "unit": "C",
                       "value": 21.5 + 40 / 8, "ts": body[0]["ts"], "boot_ms": None,
                       "pre_sync": False}
    assert datetime.fromisoformat(body[0]["ts"]) == datetime.fromtimestamp(
        (fleet.gateway.ts_base + 40_000) / 1000, UTC)


def test_window_is_per_device_and_holds_for_many_devices_in_one_batch(fleet, session):
    devices = [random_wire_id() for _ in range(20)]
    for device in devices:
        fleet.gateway.telemetry(device, 1, range(1, 8))
    fleet.settled()
    session.expire_all()
    counts = session.exec(select(RecentReading.wire_id, func.count())
                          .where(RecentReading.wire_id.in_(devices))
                          .group_by(RecentReading.wire_id)).all()
    assert sorted(counts) == sorted((device, 5) for device in devices)


def test_duplicates_are_stored_once(fleet, session, box, viewer):
    site = make_site(session, box)
    device = make_device(session, box, site)
    fleet.gateway.site = site.slug
    fleet.gateway.telemetry(device.wire_id, 3, range(1, 4))
    fleet.gateway.telemetry(device.wire_id, 3, range(1, 4), replayed=True)  # same transaction
    fleet.settled()
    fleet.gateway.telemetry(device.wire_id, 3, range(2, 5), replayed=True, value=99.0)  # later
    fleet.settled()
    assert stored_keys(session, device.wire_id) == [(3, 4), (3, 3), (3, 2), (3, 1)]
    session.expire_all()
    first = session.get(RecentReading, (device.wire_id, 3, 2))
    assert first.value == 21.5 + 2 / 8  # the first copy stays; a repeat changes nothing


def test_readings_of_a_device_never_heard_are_empty_and_an_unknown_id_is_404(fleet, session, box,
                                                                             viewer):
    device = make_device(session, box)
    assert api_readings(fleet, viewer, device.id) == []
    missing = fleet.client.get(f"/api/devices/{uuid.uuid4()}/readings", headers=viewer)
    assert missing.status_code == 404
    too_many = fleet.client.get(f"/api/devices/{device.id}/readings?limit=501", headers=viewer)
    assert too_many.status_code == 422


# ---- bad input


def test_malformed_messages_are_counted_and_skipped_without_stopping_the_worker(fleet, session):
    device = random_wire_id()
    gw = fleet.gateway
    good = {"device": device, "site": "site-a", "gateway": "pi-01", "boot": 1, "seq": 1,
            "replayed": False, "readings": [{"seq": 1, "sensor": "temperature", "value": 21.5,
                                             "unit": "C", "ts": None, "pre_sync": True,
                                             "boot_ms": 4210}]}
    bad = [
        (f"site-a/{device}/telemetry", b"\xff not json"),
        (f"site-a/{device}/telemetry", b"[1, 2, 3]"),
        (f"site-a/{device}/telemetry", json.dumps({**good, "boot": -1})),
        (f"site-a/{device}/telemetry", json.dumps({**good, "device": random_wire_id()})),
        (f"site-a/{device}/telemetry",
         json.dumps({**good, "readings": [{**good["readings"][0], "value": float("nan")}]})),
        (f"site-a/{device}/telemetry",
         json.dumps({**good, "readings": [{**good["readings"][0], "sensor": "x" * 65}]})),
        (f"site-a/{device}/status", json.dumps({"device": device, "gateway": "pi-01"})),
        ("site-a/gateway/status", json.dumps({"state": "online", "gateway": "pi-01"})),
        ("site-a/gateway/pi-01/status", json.dumps({"state": "sleeping", "gateway": "pi-01"})),
        (f"site-a/{device.upper()}/telemetry", json.dumps({**good, "device": device.upper()})),
        (f"site-a/{device}/status", json.dumps({"device": device, "gateway": "pi-01",
                                                "last_seen_ms": now_ms(), "firmware": "0.1\x00"})),
    ]
    for topic, payload in bad:
        gw.publish(topic, payload)
    gw.publish(f"site-a/{device}/telemetry", json.dumps(good))
    fleet.settled()

    assert fleet.worker.stats.malformed == len(bad)
    assert fleet.worker.stats.written == 1
    assert fleet.worker.subscribed.is_set()
    session.expire_all()
    stored = session.get(RecentReading, (device, 1, 1))
    assert (stored.ts, stored.boot_ms, stored.pre_sync) == (None, 4210, True)


def test_a_refused_write_is_retried_and_a_batch_that_cannot_be_written_is_dropped(
        fleet, session, monkeypatch):
    real = ingest.write_batch
    failures = iter([
        sa.exc.OperationalError("COMMIT", {}, Exception("server closed the connection")),
        None,
        sa.exc.DataError("INSERT", {}, Exception("invalid input syntax")),
    ])

    def flaky(engine, batch):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real(engine, batch)

    monkeypatch.setattr(ingest, "write_batch", flaky)
    retried, dropped, after = random_wire_id(), random_wire_id(), random_wire_id()
    stats = fleet.worker.stats
    fleet.gateway.telemetry(retried, 1, range(1, 2))
    wait_until(lambda: stats.written == 1, "the retried batch")
    fleet.gateway.telemetry(dropped, 1, range(1, 2))
    wait_until(lambda: stats.dropped == 1, "the batch to be dropped")
    fleet.gateway.telemetry(after, 1, range(1, 2))
    wait_until(lambda: stats.written == 2, "the next batch")
    assert stats.write_failures == 2
    assert [bool(stored_keys(session, d)) for d in (retried, dropped, after)] == [True, False, True]


# ---- where it runs, and how it connects


def test_shutdown_writes_what_was_received(app, broker, publisher, session):
    settings = ingest_settings(app, broker, ingest_batch_interval_s=30)  # no write on its own
    device = random_wire_id()
    with running_fleet(settings, publisher) as fleet:
        fleet.gateway.telemetry(device, 1, range(1, 4))
        wait_until(lambda: fleet.worker.stats.received == 1, "the message to arrive")
        assert fleet.worker.stats.written == 0
    assert stored_keys(session, device) == [(1, 3), (1, 2), (1, 1)]


def test_shared_subscription_splits_telemetry_between_instances(app, broker, publisher, session):
    if broker.kind != "mosquitto":
        pytest.skip(f"shared subscriptions need mosquitto; this broker is {broker.describe()}")
    group = f"g-{uuid.uuid4().hex[:6]}"
    first = ingest_settings(app, broker, mqtt_shared=True, mqtt_share_group=group)
    second = first.model_copy(update={"mqtt_client_id": f"fleet-{uuid.uuid4().hex[:8]}"})
    devices = [random_wire_id() for _ in range(30)]
    with running_fleet(first, publisher) as one, running_fleet(second, publisher) as two:
        assert subscriptions(first)[0] == f"$share/{group}/{first.mqtt_topic_prefix}/+/+/telemetry"
        for device in devices:
            one.gateway.telemetry(device, 1, range(1, 3))
        one.settled(two)
        split = (one.worker.stats.written, two.worker.stats.written)
        assert sum(split) == len(devices) and min(split) > 0, split

        one.gateway.gateway_status("online", since_ms=now_ms(), dropped={})  # never shared
        wait_until(lambda: two.worker.stats.written + one.worker.stats.written == 32,
                   "both instances to take the gateway status")
    session.expire_all()
    total = session.exec(select(func.count()).select_from(RecentReading)
                         .where(RecentReading.wire_id.in_(devices))).one()
    assert total == 2 * len(devices)


def test_ingest_logs_in_over_tls_with_the_fleet_account_of_the_example_acl(
        app, publisher, session, tmp_path):
    material = make_tls_material(tmp_path / "tls")
    users = {"fleet": "fleet-pw", "gw-site-a": "site-a-pw"}
    tls = TlsFiles(ca_file=material.ca_file, cert_file=material.server_cert,
                   key_file=material.server_key)
    try:
        secure = LocalBroker(tmp_path / "broker", require_mosquitto=True, users=users,
                             acl_file=ACL_EXAMPLE, tls=tls)
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    with secure:
        gateway = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gw-site-a-pi-01")
        gateway.username_pw_set("gw-site-a", users["gw-site-a"])
        gateway.tls_set(ca_certs=str(material.ca_file))
        gateway.connect(secure.host, secure.port)
        gateway.loop_start()
        try:
            settings = ingest_settings(
                app, secure, mqtt_topic_prefix="kinhbac", mqtt_username="fleet",
                mqtt_password=SecretStr("fleet-pw"), mqtt_tls=True, mqtt_ca_file=material.ca_file)
            with running_fleet(settings, gateway) as fleet:
                device = random_wire_id()
                fleet.gateway.status(device)
                fleet.settled()
        finally:
            gateway.disconnect()
            gateway.loop_stop()
    session.expire_all()
    assert session.get(DeviceStatus, device).gateway == "pi-01"


# ---- pieces without a broker


def test_settings_for_ingest_name_what_is_wrong(monkeypatch, tmp_path):
    monkeypatch.setenv("KINHBAC_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("KINHBAC_MQTT_CA_FILE", str(tmp_path / "ca.pem"))
    with pytest.raises(SettingsError, match="KINHBAC_MQTT_CA_FILE is set but KINHBAC_MQTT_TLS"):
        load_settings()
    monkeypatch.delenv("KINHBAC_MQTT_CA_FILE")
    monkeypatch.setenv("KINHBAC_MQTT_TOPIC_PREFIX", "kinhbac/#")
    with pytest.raises(SettingsError, match="mqtt_topic_prefix: 'kinhbac/#': no MQTT wildcards"):
        load_settings()
    monkeypatch.setenv("KINHBAC_MQTT_TOPIC_PREFIX", "city/kinhbac")
    monkeypatch.setenv("KINHBAC_MQTT_SHARED", "true")
    settings = load_settings()
    assert not settings.ingest_enabled  # serve runs the ingest only when asked to
    assert subscriptions(settings) == [
        "$share/kinhbac-fleet/city/kinhbac/+/+/telemetry",
        "$share/kinhbac-fleet/city/kinhbac/+/+/status",
        "city/kinhbac/+/gateway/+/status",  # retained gateway states reach every instance
        "$share/kinhbac-fleet/city/kinhbac/+/+/ota",
    ]


def test_batch_keeps_the_newest_of_everything_in_bounded_memory():
    at = datetime(2026, 11, 29, tzinfo=UTC)
    batch = Batch(window=3)
    for seq in range(1, 1001):
        batch.add_readings("d1", [{"boot": 1, "seq": seq}])
    assert len(batch.readings["d1"]) <= 2 * 3
    assert [(r["boot"], r["seq"]) for r in batch.reading_rows()] == [(1, 998), (1, 999),
                                                                      (1, 1000)]
    batch.add_status({"wire_id": "d1", "last_seen_at": at, "firmware": "2"})
    batch.add_status({"wire_id": "d1", "last_seen_at": at - timedelta(seconds=1),
                      "firmware": "1"})
    assert batch.statuses["d1"]["firmware"] == "2"

    # A write that failed is merged back under what came meanwhile: newer wins.
    newer = Batch(window=3)
    newer.add_gateway({"site": "s", "gateway": "g", "state": "offline", "since_at": None,
                       "dropped": {}, "received_at": at})
    older = Batch(window=3)
    older.add_gateway({"site": "s", "gateway": "g", "state": "online", "since_at": at,
                       "dropped": {"disk_cap": 2}, "received_at": at})
    older.extend(newer)
    assert older.gateways[("s", "g")] == {"site": "s", "gateway": "g", "state": "offline",
                                          "since_at": at, "dropped": {"disk_cap": 2},
                                          "received_at": at}
