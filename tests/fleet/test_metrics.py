"""The fleet's /metrics (kinhbac/fleet/metrics.py), against the real app on both databases:
requests by route template, the label set bounded whatever a scanner sends, devices and
rollouts by state, the ingest's counters after messages through the real broker, and the
metrics token. The text is read with prometheus_client's own parser.
"""

import json
import random
import string
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlmodel import select

from kinhbac.fleet import rollouts
from kinhbac.fleet.app import create_app
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.ingest import Batch, IngestWorker
from kinhbac.fleet.metrics import METHODS, UNMATCHED, FleetMetrics
from kinhbac.fleet.models import (
    Device,
    DeviceState,
    Role,
    Rollout,
    RolloutCreate,
    RolloutState,
    RolloutTarget,
)
from kinhbac.fleet.settings import Settings

from .test_ingest import (  # noqa: F401 (fixtures)
    broker,
    ingest_settings,
    now_ms,
    publisher,
    random_wire_id,
    running_fleet,
)
from .utils import bearer, make_device, make_release, make_site, make_user

TOKEN = "metrics-" + "t" * 40
SCRAPER = bearer(TOKEN)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextmanager
def metrics_app(app: FastAPI, **overrides: Any) -> Iterator[TestClient]:
    """A fresh app (its own registry, so counts start at 0) with a metrics token, on the
    test's database."""
    settings = app.state.settings.model_copy(update={"metrics_token": SecretStr(TOKEN),
                                                     **overrides})
    ours = create_app(settings, prepare=False)
    try:
        with TestClient(ours) as client:
            yield client
    finally:
        ours.state.engine.dispose()


@pytest.fixture
def scraped(app, session) -> Iterator[TestClient]:
    with metrics_app(app) as client:
        yield client


def scrape(client: TestClient) -> Samples:
    """Every sample of /metrics, by (sample name, sorted labels)."""
    response = client.get("/metrics", headers=SCRAPER)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def labelled(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def requests(samples: Samples) -> dict[tuple[str, str, str], float]:
    """kinhbac_fleet_http_requests_total by (route, method, status)."""
    return {(dict(labels)["route"], dict(labels)["method"], dict(labels)["status"]): value
            for labels, value in labelled(samples, "kinhbac_fleet_http_requests_total").items()}


def templates(app: FastAPI) -> set[str]:
    """The app's route templates, as its OpenAPI schema names them, and /metrics."""
    return set(app.openapi()["paths"]) | {"/metrics"}


# ---- HTTP requests


def test_requests_are_counted_by_route_template_never_by_raw_path(scraped, session, box):
    device = make_device(session, box, make_site(session, box))
    _, token = make_user(session, Role.viewer)
    for _ in range(2):
        assert scraped.get(f"/api/devices/{device.id}", headers=bearer(token)).status_code == 200
    assert scraped.get(f"/api/devices/{uuid.uuid4()}", headers=bearer(token)).status_code == 404
    assert scraped.get("/api/devices").status_code == 401
    assert scraped.delete("/api/health").status_code == 405
    assert scraped.get(f"/wp-admin/{device.id}.php").status_code == 404

    samples = scrape(scraped)
    counted = requests(samples)
    assert counted[("/api/devices/{device_id}", "GET", "200")] == 2
    assert counted[("/api/devices/{device_id}", "GET", "404")] == 1
    assert counted[("/api/devices", "GET", "401")] == 1
    assert counted[("/api/health", "DELETE", "405")] == 1  # a wrong method keeps its route
    assert counted[(UNMATCHED, "GET", "404")] == 1
    assert not any(str(device.id) in str(labels) for _, labels in samples), "a raw id as label"
    latency = labelled(samples, "kinhbac_fleet_http_request_duration_seconds_count")
    assert latency[(("route", "/api/devices/{device_id}"),)] == 3
    assert latency[(("route", UNMATCHED),)] == 1


def test_a_flood_of_random_paths_and_methods_leaves_the_label_set_bounded(scraped, app):
    rng = random.Random(14)

    def word() -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits + "-_.%", k=12))

    methods = ["GET", "POST", "PUT", "DELETE", "PROPFIND", "BREW", "X" + word().upper()]
    for n in range(300):
        path = rng.choice([f"/{word()}", f"/api/{word()}/{word()}", f"/api/devices/{word()}/x",
                           f"/api/devices/{word()}", f"/.env{n}", f"/api/sites/{word()}/nope"])
        scraped.request(rng.choice(methods), path)

    samples = scrape(scraped)
    counted = requests(samples)
    assert {route for route, _, _ in counted} <= templates(app) | {UNMATCHED}
    assert {method for _, method, _ in counted} <= METHODS | {"other"}
    # Routes x methods x statuses the flood can reach: a handful, not 300.
    assert len(counted) <= 30, sorted(counted)
    assert sum(counted.values()) == 300
    latency = labelled(samples, "kinhbac_fleet_http_request_duration_seconds_count")
    assert {dict(labels)["route"] for labels in latency} <= templates(app) | {UNMATCHED}


def test_a_request_refused_for_its_size_counts_under_its_route(scraped):
    response = scraped.post("/api/devices/bulk", content=b"x" * (3 * 1024 * 1024))
    assert response.status_code == 413
    assert requests(scrape(scraped))[("/api/devices/bulk", "POST", "413")] == 1


# ---- access


def test_metrics_are_refused_without_the_token_or_with_a_wrong_one(scraped, session):
    _, admins = make_user(session, Role.admin)  # a user's token, even an admin's, is not it
    for headers in ({}, bearer("metrics-" + "x" * 40), bearer(TOKEN[:-1]), bearer(TOKEN + "t"),
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
                    bearer(admins)):
        response = scraped.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert "kinhbac_fleet" not in response.text
    assert scraped.get("/metrics", headers=SCRAPER).status_code == 200


def test_without_a_metrics_token_there_is_no_metrics_route(client):
    # The session's app has no KINHBAC_METRICS_TOKEN: /metrics answers as an unknown path.
    unknown = client.get("/no-such-path")
    for headers in ({}, SCRAPER):
        response = client.get("/metrics", headers=headers)
        assert (response.status_code, response.json()) == (404, unknown.json())


def test_each_app_has_a_registry_of_its_own(app, session):
    with metrics_app(app) as first, metrics_app(app) as second:
        first.get("/api/health")
        first.get("/api/health")
        second.get("/api/health")
        assert requests(scrape(first))[("/api/health", "GET", "200")] == 2
        assert requests(scrape(second))[("/api/health", "GET", "200")] == 1


# ---- devices and rollouts by state


def test_devices_and_rollouts_are_gauged_by_state(scraped, session, box, app):
    site = make_site(session, box)
    devices = [make_device(session, box, site) for _ in range(7)]
    wanted = [DeviceState.active] * 3 + [DeviceState.pending] * 2 + [DeviceState.revoked,
                                                                      DeviceState.rejected]
    for provisioned, state in zip(devices, wanted, strict=True):
        row = session.get(Device, provisioned.id)
        assert row is not None
        row.state = state
        session.add(row)
    session.commit()
    release = make_release(session, app)
    made = [rollouts.create_rollout(session, CLI, RolloutCreate(
        release_id=release.id, target=RolloutTarget(devices=[device.wire_id]))).id
        for device in devices[:3]]
    for rollout_id, state in zip(made[1:], (RolloutState.paused, RolloutState.cancelled),
                                 strict=True):
        rollout = session.exec(select(Rollout).where(Rollout.id == rollout_id)).one()
        rollout.state = state
        session.add(rollout)
    session.commit()

    samples = scrape(scraped)
    gauged = {dict(labels)["state"]: value
              for labels, value in labelled(samples, "kinhbac_fleet_devices").items()}
    assert gauged == {"registered": 0, "pending": 2, "active": 3, "revoked": 1, "rejected": 1}
    gauged = {dict(labels)["state"]: value
              for labels, value in labelled(samples, "kinhbac_fleet_rollouts").items()}
    assert gauged == {"created": 0, "running": 1, "paused": 1, "completed": 0, "cancelled": 1}
    assert labelled(samples, "kinhbac_fleet_database_up") == {(): 1}


def test_state_counts_fail_alone_when_the_database_is_away(app, session):
    with metrics_app(app, database_url="sqlite:////nonexistent/folder/fleet.sqlite3") as client:
        client.get("/api/ping-nothing")
        samples = scrape(client)
    assert labelled(samples, "kinhbac_fleet_database_up") == {(): 0}
    assert not labelled(samples, "kinhbac_fleet_devices")
    assert requests(samples)[(UNMATCHED, "GET", "404")] == 1  # the rest is still served


# ---- the ingest


def test_ingest_is_counted_after_messages_through_the_broker(app, broker, publisher, session,
                                                             box):
    site = make_site(session, box, slug=f"s-{uuid.uuid4().hex[:6]}")
    device = make_device(session, box, site)
    settings = ingest_settings(app, broker, metrics_token=SecretStr(TOKEN))
    with running_fleet(settings, publisher) as fleet:
        gateway = fleet.gateway
        gateway.site = site.slug
        gateway.ts_base = now_ms() - 30_000  # readings 25-29 s old (ts_base + seq seconds)
        gateway.telemetry(device.wire_id, 3, range(1, 4))  # 3 readings
        gateway.telemetry(random_wire_id(), 1, range(1, 3))  # 2 readings, unknown but seen
        gateway.status(device.wire_id)
        gateway.publish(f"{site.slug}/{device.wire_id}/telemetry", b"not json")
        gateway.publish(f"{site.slug}/{device.wire_id}/status", b"", retain=True)  # cleared
        other = f"o-{uuid.uuid4().hex[:6]}"  # the device under another site's topics
        gateway.site = other
        gateway.telemetry(device.wire_id, 3, range(4, 6))
        gateway.site = site.slug
        fleet.settled()
        samples = scrape(fleet.client)

    def total(name: str) -> float:
        return samples[(f"kinhbac_fleet_ingest_{name}_total", ())]

    assert total("messages_received") == 6
    assert total("messages_written") == 4
    assert total("messages_malformed") == 1
    assert total("messages_ignored") == 1
    assert total("messages_dropped") == 0
    assert total("readings_written") == 5  # the other site's 2 were refused, not written
    assert samples[("kinhbac_fleet_ingest_rows_refused_total", (("reason", "site"),))] == 2
    assert samples[("kinhbac_fleet_ingest_rows_refused_total", (("reason", "boot"),))] == 0
    assert total("batches") >= 1
    assert samples[("kinhbac_fleet_ingest_subscribed", ())] == 1
    # Each transaction's newest reading was 25 s old when it came, or a little older.
    lag_count = samples[("kinhbac_fleet_ingest_lag_seconds_count", ())]
    assert lag_count >= 1
    assert 25 <= samples[("kinhbac_fleet_ingest_lag_seconds_sum", ())] / lag_count < 60
    assert samples[("kinhbac_fleet_ingest_last_commit_timestamp_seconds", ())] > 0


def test_an_instance_without_the_ingest_has_no_ingest_series(scraped):
    assert not [name for name, _ in scrape(scraped) if "ingest" in name]


def telemetry(device: str, *stamps: datetime | None) -> str:
    """A telemetry message as a gateway publishes it (docs/mqtt.md), one reading a stamp."""
    readings = [{"seq": seq, "sensor": "temperature", "value": 21.5, "unit": "C",
                 "ts": None if at is None else int(at.timestamp() * 1000),
                 **({"boot_ms": 1000} if at is None else {}), "pre_sync": at is None}
                for seq, at in enumerate(stamps, 1)]
    return json.dumps({"device": device, "site": "s1", "gateway": "pi-01", "boot": 1, "seq": 1,
                       "replayed": False, "readings": readings})


def test_lag_is_the_newest_readings_age_and_neither_a_replay_nor_a_clock_ahead_hides_it():
    engine = sa.create_engine("sqlite://")
    metrics = FleetMetrics(engine, lambda: None, with_ingest=True)
    worker = IngestWorker(Settings(env="development"), engine)
    now = datetime.now(UTC)
    worker.accept("kinhbac/s1/00000000000000d1/telemetry",  # a gateway's replay after an outage
                  telemetry("00000000000000d1", now - timedelta(hours=3)), received=now)
    worker.accept("kinhbac/s1/00000000000000d2/telemetry",  # live, with one before time sync
                  telemetry("00000000000000d2", now - timedelta(seconds=20), None), received=now)
    worker.accept("kinhbac/s1/00000000000000d3/telemetry",  # a node clock an hour ahead
                  telemetry("00000000000000d3", now + timedelta(hours=1)), received=now)
    assert not worker.stats.malformed
    metrics.ingest_committed(worker._pending, 0.01)
    statuses_only = Batch(window=10)  # nothing to age: no observation
    statuses_only.add_status({"wire_id": "d4", "last_seen_at": now})
    metrics.ingest_committed(statuses_only, 0.01)
    merged = Batch(window=10)  # a failed write merged back keeps its newest reading's time
    merged.extend(worker._pending)
    assert merged.newest_reading_at == worker._pending.newest_reading_at

    lag = {s.name: s.value for s in metrics.ingest_lag.collect()[0].samples}
    assert lag["kinhbac_fleet_ingest_lag_seconds_count"] == 1
    assert 20 <= lag["kinhbac_fleet_ingest_lag_seconds_sum"] < 60
    batches = {s.name: s.value for s in metrics.ingest_batch_seconds.collect()[0].samples}
    assert batches["kinhbac_fleet_ingest_batch_seconds_count"] == 2
