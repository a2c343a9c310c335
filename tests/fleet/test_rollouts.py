"""Rollouts driven by progress as the gateways publish it: through a private mosquitto and the
fleet's real ingest, on both databases. Waves advance, pause, complete; deadlines time devices
out; what a site's broker account may not say about a rollout is refused, and steps that would
move a device backwards, or come again, are recorded and ignored."""

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from kinhbac import mqtt_contract
from kinhbac.fleet import rollouts
from kinhbac.fleet.app import create_app
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.models import (
    Device,
    Role,
    RolloutCreate,
    RolloutDevice,
    RolloutEvent,
    RolloutTarget,
    utcnow,
)

from .test_ingest import (  # noqa: F401 (fixtures)
    Fleet,
    broker,
    ingest_settings,
    now_ms,
    publisher,
    running_fleet,
    stored_keys,
    wait_until,
)
from .utils import bearer, make_device, make_gateway, make_release, make_site, make_user

STEPS = ("offered", "downloading", "verifying", "installed", "rebooting", "confirmed")


@pytest.fixture
def fleet(app, broker, publisher, session) -> Iterator[Fleet]:  # noqa: F811
    with running_fleet(ingest_settings(app, broker), publisher) as f:
        yield f


@pytest.fixture
def admin(session) -> dict[str, str]:
    return bearer(make_user(session, Role.admin)[1])


class Site:
    """A site with devices, its gateway's token, and a rollout's view of it."""

    def __init__(self, session, box, n: int) -> None:
        self.site = make_site(session, box)
        self.devices = [make_device(session, box, self.site) for _ in range(n)]
        _, token = make_gateway(session, self.site)
        self.gateway = bearer(token)


def start(session, release, devices, **fields) -> uuid.UUID:
    return rollouts.create_rollout(session, CLI, RolloutCreate(
        release_id=release.id, target=RolloutTarget(devices=[d.wire_id for d in devices]),
        **fields)).id


def report(fleet: Fleet, site: str, wire_id: str, release_id, rollout_id, state: str, *,
           ts_ms: int | None = None, bytes_so_far: int = 0, reason: str = "",
           boot: int | None = 7, version: str = "0.2.0") -> None:
    """One update step, as the gateway publishes it (mqtt_contract, the one both sides use)."""
    payload = mqtt_contract.ota_progress_payload(
        device=wire_id, site=site, gateway="pi-01", release_id=str(release_id),
        rollout_id=None if rollout_id is None else str(rollout_id), version=version,
        state=state, ts_ms=now_ms() if ts_ms is None else ts_ms, bytes_so_far=bytes_so_far,
        reason=reason, boot=None if state == "offered" else boot)
    fleet.gateway.publish(f"{site}/{wire_id}/ota", payload)


def walk(fleet, site, wire_id, release_id, rollout_id, states=STEPS, *, final=None) -> None:
    """A device's steps in order, a millisecond apart; `final` replaces the last."""
    base = now_ms()
    states = list(states)
    if final is not None:
        states[-1] = final
    for i, state in enumerate(states):
        report(fleet, site, wire_id, release_id, rollout_id, state, ts_ms=base + i,
               bytes_so_far=4096 if state != "offered" else 0,
               reason="boot never reached the gateway" if state == "rolled_back" else "")


def shown(fleet, admin, rollout_id) -> dict:
    answer = fleet.client.get(f"/api/rollouts/{rollout_id}", headers=admin)
    assert answer.status_code == 200, answer.text
    return answer.json()


def assigned(fleet, gateway) -> list[str]:
    answer = fleet.client.get("/api/gateway/ota", headers=gateway)
    assert answer.status_code == 200, answer.text
    return [a["device_id"] for a in answer.json()["assignments"]]


def in_wave(session, rollout_id, wave: int) -> list[str]:
    """Wire ids of the wave's devices, in the rollout's order."""
    session.expire_all()
    return list(session.exec(
        select(Device.wire_id).join(RolloutDevice, RolloutDevice.device_id == Device.id)
        .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.wave == wave)
        .order_by(RolloutDevice.position)).all())


def test_waves_advance_on_confirmations_and_the_rollout_completes(fleet, session, box, app,
                                                                   admin):
    here = Site(session, box, 4)
    fleet.gateway.site = here.site.slug
    release = make_release(session, app, version="0.2.0")
    rollout_id = start(session, release, here.devices, waves=[25, 100])
    [first] = in_wave(session, rollout_id, 0)
    rest = in_wave(session, rollout_id, 1)
    assert assigned(fleet, here.gateway) == [first]  # later waves wait

    walk(fleet, here.site.slug, first, release.id, rollout_id)
    fleet.settled()

    detail = shown(fleet, admin, rollout_id)
    assert detail["current_wave"] == 1 and detail["state"] == "running"
    assert detail["waves"][0]["counts"] == {"confirmed": 1}
    assert detail["waves"][1]["started_at"] is not None
    assert sorted(assigned(fleet, here.gateway)) == sorted(rest)
    events = fleet.client.get(f"/api/rollouts/{rollout_id}/events", headers=admin,
                              params={"device": first}).json()["items"]
    assert [(e["from_state"], e["to_state"], e["source"], e["ignored"]) for e in events] == [
        ("pending", "offered", "gateway", False), ("offered", "downloading", "node", False),
        ("downloading", "verifying", "node", False), ("verifying", "installed", "node", False),
        ("installed", "rebooting", "node", False), ("rebooting", "confirmed", "node", False)]

    # The rest skip straight to confirmed (their offers were not heard: no matter).
    for wire_id in rest:
        report(fleet, here.site.slug, wire_id, release.id, None, "confirmed")
    fleet.settled()
    detail = shown(fleet, admin, rollout_id)
    assert detail["state"] == "completed" and detail["counts"] == {"confirmed": 4}
    assert assigned(fleet, here.gateway) == []


def test_a_wave_that_fails_too_often_pauses_and_a_resume_waits_for_new_failures(
        fleet, session, box, app, admin):
    here = Site(session, box, 20)
    fleet.gateway.site = here.site.slug
    release = make_release(session, app, version="0.2.0")
    rollout_id = start(session, release, here.devices, waves=[50, 100], failure_threshold=10)
    wave = in_wave(session, rollout_id, 0)
    assert len(wave) == 10  # failures pause it past 10 %: at the second of ten

    walk(fleet, here.site.slug, wave[0], release.id, rollout_id, final="rolled_back")
    fleet.settled()
    assert shown(fleet, admin, rollout_id)["state"] == "running"
    walk(fleet, here.site.slug, wave[1], release.id, rollout_id, STEPS[:3], final="failed")
    fleet.settled()

    detail = shown(fleet, admin, rollout_id)
    assert detail["state"] == "paused"
    assert detail["paused_reason"] == (
        "wave 1 of 2 (50% of the target): 2 of its 10 devices failed (1 failed, 1 rolled back, "
        "0 timed out), past the 10% failure threshold")
    assert assigned(fleet, here.gateway) == []  # the gateway stops offering
    assert detail["current_wave"] == 0  # and later waves never start

    # A device that was mid-way when it paused still reports: recorded, counted.
    walk(fleet, here.site.slug, wave[2], release.id, rollout_id)
    fleet.settled()
    assert shown(fleet, admin, rollout_id)["waves"][0]["counts"]["confirmed"] == 1

    resumed = fleet.client.post(f"/api/rollouts/{rollout_id}/resume", headers=admin)
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    assert len(assigned(fleet, here.gateway)) == 7  # the wave's unfinished devices again
    walk(fleet, here.site.slug, wave[3], release.id, rollout_id, final="failed")
    fleet.settled()
    detail = shown(fleet, admin, rollout_id)
    assert detail["state"] == "paused" and "3 of its 10 devices failed" in detail["paused_reason"]


def test_backward_and_repeated_steps_are_recorded_and_ignored_and_redeliveries_once(
        fleet, session, box, app, admin):
    here = Site(session, box, 1)
    fleet.gateway.site = here.site.slug
    release = make_release(session, app, version="0.2.0")
    rollout_id = start(session, release, here.devices, waves=[100])
    wire_id = here.devices[0].wire_id
    base = now_ms()
    slug = here.site.slug
    report(fleet, slug, wire_id, release.id, rollout_id, "offered", ts_ms=base)
    report(fleet, slug, wire_id, release.id, rollout_id, "installed", ts_ms=base + 2,
           bytes_so_far=9000)
    report(fleet, slug, wire_id, release.id, rollout_id, "installed", ts_ms=base + 2,
           bytes_so_far=9000)  # the broker delivered it twice
    fleet.settled()
    report(fleet, slug, wire_id, release.id, rollout_id, "downloading", ts_ms=base + 1,
           bytes_so_far=100)  # heard late: it would move the device backwards
    fleet.settled()
    report(fleet, slug, wire_id, release.id, rollout_id, "confirmed", ts_ms=base + 3)
    fleet.settled()
    report(fleet, slug, wire_id, release.id, rollout_id, "confirmed", ts_ms=base + 60_000)
    report(fleet, slug, wire_id, release.id, rollout_id, "failed", ts_ms=base + 60_001,
           reason="a forged failure after the fact")
    fleet.settled()

    events = fleet.client.get(f"/api/rollouts/{rollout_id}/events", headers=admin).json()
    assert [(e["from_state"], e["to_state"], e["ignored"]) for e in events["items"]] == [
        ("pending", "offered", False), ("offered", "installed", False),
        ("installed", "downloading", True), ("installed", "confirmed", False),
        ("confirmed", "confirmed", True), ("confirmed", "failed", True)]
    assert events["items"][2]["reason"] == "ignored: backwards from installed"
    assert events["items"][5]["reason"] == ("ignored: after its final state (confirmed); a "
                                            "forged failure after the fact")
    [device] = fleet.client.get(f"/api/rollouts/{rollout_id}/devices",
                                headers=admin).json()["items"]
    assert (device["state"], device["bytes"]) == ("confirmed", 9000)
    assert shown(fleet, admin, rollout_id)["state"] == "completed"


def test_progress_a_site_may_not_report_is_refused(fleet, session, box, app, admin):
    home, attacker = Site(session, box, 2), Site(session, box, 1)
    release = make_release(session, app, version="0.2.0")
    other_release = make_release(session, app, version="0.3.0")
    rollout_id = start(session, release, [home.devices[0]], waves=[100])
    victim, bystander = home.devices[0].wire_id, home.devices[1].wire_id
    outsider = attacker.devices[0].wire_id

    # Site B's account names site A's device under its own topics.
    fleet.gateway.site = attacker.site.slug
    report(fleet, attacker.site.slug, victim, release.id, rollout_id, "failed",
           reason="forged")
    # Under the victim's own site: an unknown rollout, another release, a device not in it,
    # no rollout of that release at all, a device the fleet does not know.
    fleet.gateway.site = home.site.slug
    slug = home.site.slug
    report(fleet, slug, victim, release.id, uuid.uuid4(), "failed")
    report(fleet, slug, victim, other_release.id, rollout_id, "failed")
    report(fleet, slug, bystander, release.id, rollout_id, "failed")
    report(fleet, slug, victim, other_release.id, None, "failed")
    report(fleet, slug, "00" * 8, release.id, rollout_id, "failed")
    # The attacker's own device, named in a rollout it is not in.
    report(fleet, slug, outsider, release.id, rollout_id, "failed")
    # A payload for one device under another's topic.
    payload = mqtt_contract.ota_progress_payload(
        device=victim, site=slug, gateway="pi-01", release_id=str(release.id),
        rollout_id=str(rollout_id), version="0.2.0", state="failed", ts_ms=now_ms())
    fleet.gateway.publish(f"{slug}/{bystander}/ota", payload)
    fleet.settled()

    assert fleet.worker.stats.refused_ota == 7
    assert fleet.worker.stats.malformed == 1
    detail = shown(fleet, admin, rollout_id)
    assert detail["state"] == "running" and detail["counts"] == {"pending": 1}
    assert fleet.client.get(f"/api/rollouts/{rollout_id}/events",
                            headers=admin).json()["total"] == 0

    # And the real gateway's report still goes through.
    report(fleet, slug, victim, release.id, rollout_id, "offered")
    fleet.settled()
    assert shown(fleet, admin, rollout_id)["counts"] == {"offered": 1}


def test_an_update_step_the_rules_fail_on_costs_the_steps_not_the_readings_that_came_with_it(
        app, broker, publisher, session, box, monkeypatch):
    here = Site(session, box, 1)
    release = make_release(session, app, version="0.2.0")
    rollout_id = start(session, release, here.devices, waves=[100])
    wire_id = here.devices[0].wire_id

    def broken(session, steps):
        raise RuntimeError("a bug in the rules")

    monkeypatch.setattr(rollouts, "apply_progress", broken)
    # No write on its own: the step and the readings go in one batch, written at shutdown.
    settings = ingest_settings(app, broker, ingest_batch_interval_s=30)
    with running_fleet(settings, publisher) as fleet:
        fleet.gateway.site = here.site.slug
        report(fleet, here.site.slug, wire_id, release.id, rollout_id, "offered")
        fleet.gateway.telemetry(wire_id, 1, range(1, 4))
        wait_until(lambda: fleet.worker.stats.received == 2, "both messages to arrive")
        stats = fleet.worker.stats
    # Before: the exception dropped the whole batch, the readings with the step.
    assert (stats.dropped, stats.write_failures, stats.steps_failed) == (0, 0, 1)
    assert stored_keys(session, wire_id) == [(1, 3), (1, 2), (1, 1)]
    session.expire_all()
    assert session.exec(select(RolloutEvent).where(RolloutEvent.rollout_id == rollout_id)).all() \
        == []


def test_the_app_times_out_silent_devices_by_itself(app, session, box):
    """Nobody reads the rollout: the app's periodic task applies the deadlines."""
    here = Site(session, box, 2)
    rollout_id = start(session, make_release(session, app), here.devices, waves=[100],
                       device_deadline_s=60)
    [late, _] = in_wave(session, rollout_id, 0)
    # Its deadline passes (as a day would): only this one device's.
    late_id = session.exec(select(Device.id).where(Device.wire_id == late)).one()
    record = session.get(RolloutDevice, (rollout_id, late_id))
    record.deadline_at = utcnow() - timedelta(seconds=1)
    session.add(record)
    session.commit()

    fleet_app = create_app(app.state.settings, prepare=False)
    fleet_app.state.rollout_tick_s = 0.05
    try:
        with TestClient(fleet_app):
            deadline = time.monotonic() + 10
            while True:
                session.expire_all()
                states = {e.to_state.value for e in session.exec(select(RolloutEvent).where(
                    RolloutEvent.rollout_id == rollout_id)).all()}
                if states:
                    break
                assert time.monotonic() < deadline, "the periodic task timed nothing out"
                time.sleep(0.05)
    finally:
        fleet_app.state.engine.dispose()
    session.expire_all()
    by_device = {r.device_id: r.state.value for r in session.exec(select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout_id)).all()}
    assert sorted(by_device.values()) == ["pending", "timed_out"]
    assert by_device[late_id] == "timed_out"
