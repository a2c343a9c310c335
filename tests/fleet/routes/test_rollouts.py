"""Rollouts from the admin's side and the attacker's: who may start, steer and read them, what a
rollout may target, and what each gateway is told to offer (its own site's devices only)."""

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from kinhbac.fleet import rollouts
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.models import (
    AuditEntry,
    Device,
    DeviceStatus,
    Role,
    RolloutCreate,
    RolloutTarget,
    utcnow,
)

from ..utils import at_once, bearer, make_callers, make_device, make_gateway, make_release, \
    make_site, make_user


@pytest.fixture
def admin(session):
    return bearer(make_user(session, Role.admin)[1])


def reported(session, device, firmware: str) -> None:
    """The device's last HELLO named `firmware` (what the ingest keeps)."""
    now = utcnow()
    session.add(DeviceStatus(wire_id=device.wire_id, site="x", gateway="gw1", last_seen_at=now,
                             offline_at=now, firmware=firmware, received_at=now))
    session.commit()


def start(client, headers, release_id, target, **fields):
    return client.post("/api/rollouts", headers=headers,
                       json={"release_id": str(release_id), "target": target, **fields})


def test_an_admin_starts_a_rollout_to_a_site_and_reads_it_back(client, session, box, app,
                                                                admin):
    site = make_site(session, box)
    devices = [make_device(session, box, site) for _ in range(10)]
    release = make_release(session, app, version="0.2.0")

    answer = start(client, admin, release.id, {"site": site.slug})

    assert answer.status_code == 201, answer.text
    shown = answer.json()
    assert shown["state"] == "running" and shown["current_wave"] == 0
    assert shown["release"] == {"id": str(release.id), "kind": "bundle", "version": "0.2.0"}
    assert shown["target"] == {"site": site.slug}
    assert [(w["percent"], w["size"]) for w in shown["waves"]] == [(1, 1), (10, 1), (50, 3),
                                                                   (100, 5)]
    assert shown["waves"][0]["started_at"] is not None
    assert [w["started_at"] for w in shown["waves"][1:]] == [None, None, None]
    assert shown["counts"] == {"pending": 10} and shown["total"] == 10
    assert (shown["success_threshold"], shown["failure_threshold"],
            shown["device_deadline_s"]) == (95, 5, 86400)
    assert client.get(f"/api/rollouts/{shown['id']}", headers=admin).json() == shown
    [entry] = session.exec(select(AuditEntry).where(AuditEntry.action == "rollout.create")).all()
    assert entry.entity_id == shown["id"] and entry.after["total"] == 10
    listed = {d["device_id"] for d in client.get(f"/api/rollouts/{shown['id']}/devices",
                                                 headers=admin).json()["items"]}
    assert listed == {d.wire_id for d in devices}


def test_each_gateway_is_told_only_its_own_sites_assignments(client, session, box, app, admin):
    home, other = make_site(session, box), make_site(session, box)
    here = make_device(session, box, home)
    there = make_device(session, box, other)
    release = make_release(session, app, version="0.3.0")
    _, home_token = make_gateway(session, home)
    _, other_token = make_gateway(session, other, name="gw9")
    rollout = start(client, admin, release.id, {"devices": [here.wire_id, there.wire_id]},
                    waves=[100]).json()

    answer = client.get("/api/gateway/ota", headers=bearer(home_token))

    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    manifest = hashlib.sha256(release.manifest.encode()).hexdigest()
    assert answer.json() == {"assignments": [{
        "device_id": here.wire_id, "rollout_id": rollout["id"], "release_id": str(release.id),
        "kind": "bundle", "version": "0.3.0", "manifest_sha256": manifest}]}
    theirs = client.get("/api/gateway/ota", headers=bearer(other_token)).json()
    assert [a["device_id"] for a in theirs["assignments"]] == [there.wire_id]


def refusal(answer) -> tuple[str, str]:
    assert answer.status_code == 422, answer.text
    [problem] = answer.json()["detail"]
    return problem["loc"][-1], problem["msg"]


def test_a_rollout_is_refused_by_name_when_it_cannot_be_sent(client, session, box, app, admin):
    site = make_site(session, box)
    empty = make_site(session, box)
    device = make_device(session, box, site)
    revoked = make_device(session, box, site)
    client.post(f"/api/devices/{revoked.id}/revoke", headers=admin)
    release = make_release(session, app, version="0.2.0")

    assert refusal(start(client, admin, release.id, {"site": empty.slug})) == (
        "target", f"site {empty.slug!r} has no active devices")
    assert refusal(start(client, admin, release.id, {"site": "nowhere"})) == (
        "target", "no site 'nowhere' (give its slug, name or id)")
    assert refusal(start(client, admin, release.id, {"tag": "north"})) == (
        "target", "no active device has the tag 'north'")
    assert refusal(start(client, admin, release.id, {"devices": ["00" * 8]})) == (
        "target", "no device 0000000000000000")
    assert refusal(start(client, admin, release.id, {"devices": [revoked.wire_id]})) == (
        "target", f"only active devices take updates: {revoked.wire_id} (revoked)")
    assert refusal(start(client, admin, uuid.uuid4(), {"site": site.slug}))[0] == "release_id"
    for target in ({}, {"site": site.slug, "tag": "north"}, {"devices": []},
                   {"devices": [device.wire_id, device.wire_id]}, {"devices": ["6B62"]},
                   {"group": "north"}):
        assert start(client, admin, release.id, target).status_code == 422, target
    for waves in ([], [50], [10, 10, 100], [0, 100], [50, 101], [100, 50]):
        assert start(client, admin, release.id, {"site": site.slug},
                     waves=waves).status_code == 422, waves
    for fields in ({"device_deadline_s": 59}, {"success_threshold": 0},
                   {"failure_threshold": 101}, {"shuffle": False}):
        assert start(client, admin, release.id, {"site": site.slug},
                     **fields).status_code == 422, fields
    assert client.get("/api/rollouts", headers=admin).json()["total"] == 0
    assert session.exec(select(AuditEntry).where(AuditEntry.action == "rollout.create")).all() \
        == []


def reported_free_flash(session, device, free: int) -> None:
    """The device's last status said `free` bytes of flash free (what the ingest keeps)."""
    record = session.get(Device, device.id)
    record.free_flash_bytes, record.free_flash_at = free, utcnow()
    session.add(record)
    session.commit()


def test_a_bundle_larger_than_the_free_flash_devices_reported_is_refused_naming_them(
        client, session, box, app, admin):
    site = make_site(session, box)
    short = sorted((make_device(session, box, site) for _ in range(6)), key=lambda d: d.wire_id)
    exact, silent = make_device(session, box, site), make_device(session, box, site)
    # 10,000 bytes take three 4 KiB littlefs blocks, the 4-byte file one: 16,384 bytes.
    release = make_release(session, app, version="0.2.0",
                           files={"/lib/node/app.mpy": bytes(10_000), "/lib/wire.mpy": b"wire"})
    assert json.loads(release.manifest)["min_free_bytes"] == 16_384
    for device in short:
        reported_free_flash(session, device, 12_288)
    reported_free_flash(session, exact, 16_384)  # just enough; `silent` never said

    answer = start(client, admin, release.id, {"site": site.slug})

    named = ", ".join(f"{d.wire_id} (12,288 bytes free)" for d in short[:5])
    assert refusal(answer) == (
        "target", "6 of the target's devices reported less free flash than bundle 0.2.0 needs "
        f"(16,384 bytes, its manifest's min_free_bytes): {named} and 1 more; free flash on "
        "them, or leave them out by targeting the others (a device list or a tag without them)")
    assert client.get("/api/rollouts", headers=admin).json()["total"] == 0
    assert session.exec(select(AuditEntry).where(AuditEntry.action == "rollout.create")).all() \
        == []
    # What the message says to do: the others go, the one that never reported among them
    # (its node refuses an offer too large for it by itself).
    others = start(client, admin, release.id, {"devices": [exact.wire_id, silent.wire_id]})
    assert others.status_code == 201, others.text
    assert others.json()["total"] == 2


def test_the_free_flash_check_leaves_out_images_and_devices_already_running_the_bundle(
        client, session, box, app, admin):
    site = make_site(session, box)
    full, running = make_device(session, box, site), make_device(session, box, site)
    for device in (full, running):
        reported_free_flash(session, device, 0)
    reported(session, running, "0.3.0")
    bundle = make_release(session, app, version="0.3.0")
    image = make_release(session, app, kind="image", version="1.0.0",
                         files={"micropython.bin": bytes([0xE9]) + bytes(4095)})

    # An image goes to an OTA partition, which its upload was checked against.
    assert start(client, admin, image.id, {"devices": [full.wire_id]}).status_code == 201
    # A device that runs the release already downloads nothing: confirmed, not refused.
    answer = start(client, admin, bundle.id, {"devices": [running.wire_id]})
    assert answer.status_code == 201, answer.text
    assert answer.json()["counts"] == {"confirmed": 1}


def test_a_device_running_the_release_is_confirmed_and_a_downgrade_needs_saying_so(
        client, session, box, app, admin):
    site = make_site(session, box)
    current, ahead, unknown = (make_device(session, box, site) for _ in range(3))
    reported(session, current, "0.2")  # 0.2 is 0.2.0, compared as a version
    reported(session, ahead, "0.10.0")  # newer than 0.9.1, though not as a string
    release = make_release(session, app, version="0.9.1")
    older = make_release(session, app, version="0.2.0")

    # 0.9.1 is older than what `ahead` runs: refused unless the admin says so.
    field, message = refusal(start(client, admin, release.id, {"site": site.slug}))
    assert field == "allow_downgrade" and f"{ahead.wire_id} (0.10.0)" in message
    started = start(client, admin, release.id, {"site": site.slug}, allow_downgrade=True)
    assert started.status_code == 201, started.text
    client.post(f"/api/rollouts/{started.json()['id']}/cancel", headers=admin)

    answer = start(client, admin, older.id, {"site": site.slug}, allow_downgrade=True,
                   waves=[100])
    assert answer.status_code == 201, answer.text
    devices = {d["device_id"]: d for d in client.get(
        f"/api/rollouts/{answer.json()['id']}/devices", headers=admin).json()["items"]}
    assert (devices[current.wire_id]["state"], devices[current.wire_id]["reason"]) == (
        "confirmed", "already runs 0.2.0")
    assert devices[ahead.wire_id]["state"] == devices[unknown.wire_id]["state"] == "pending"


def test_a_device_is_in_one_live_rollout_at_a_time(client, session, box, app, admin):
    site = make_site(session, box)
    device = make_device(session, box, site)
    first = start(client, admin, make_release(session, app).id, {"site": site.slug}).json()
    second = make_release(session, app)

    answer = start(client, admin, second.id, {"devices": [device.wire_id]})

    assert answer.status_code == 409, answer.text
    assert first["id"] in answer.json()["detail"] and "running" in answer.json()["detail"]
    client.post(f"/api/rollouts/{first['id']}/pause", headers=admin)
    assert start(client, admin, second.id, {"devices": [device.wire_id]}).status_code == 409
    client.post(f"/api/rollouts/{first['id']}/cancel", headers=admin)
    assert start(client, admin, second.id, {"devices": [device.wire_id]}).status_code == 201


def test_waves_are_a_shuffled_sample_fixed_by_the_rollout(session, box, app):
    site = make_site(session, box)
    devices = [make_device(session, box, site) for _ in range(200)]
    assert rollouts.wave_ends([1, 10, 50, 100], 200) == [2, 20, 100, 200]
    assert rollouts.wave_ends([1, 10, 50, 100], 3) == [1, 2, 3, 3]  # the last wave is empty
    assert rollouts.wave_ends([1, 2, 3, 100], 1000) == [10, 20, 30, 1000]
    rollout_id = uuid.uuid4()
    order = [d.wire_id for d in rollouts.shuffled(
        [session.get(Device, d.id) for d in devices], rollout_id)]
    again = [d.wire_id for d in rollouts.shuffled(
        [session.get(Device, d.id) for d in reversed(devices)], rollout_id)]
    other = [d.wire_id for d in rollouts.shuffled(
        [session.get(Device, d.id) for d in devices], uuid.uuid4())]
    assert order == again and sorted(order) == sorted(d.wire_id for d in devices)
    assert order != sorted(order) and order != other


def test_admin_steers_a_rollout_and_impossible_steps_are_refused_naming_the_state(
        client, session, box, app, admin):
    site = make_site(session, box)
    [make_device(session, box, site) for _ in range(3)]
    _, token = make_gateway(session, site)
    rollout = start(client, admin, make_release(session, app).id, {"site": site.slug},
                    waves=[100]).json()
    path = f"/api/rollouts/{rollout['id']}"

    assert client.post(f"{path}/resume", headers=admin).json()["detail"] == (
        f"rollout {rollout['id']} is running: only a paused one can be resumed")
    paused = client.post(f"{path}/pause", headers=admin)
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert paused.json()["paused_reason"].startswith("paused by admin-")
    assert client.get("/api/gateway/ota", headers=bearer(token)).json() == {"assignments": []}
    assert client.post(f"{path}/pause", headers=admin).status_code == 409
    assert client.post(f"{path}/resume", headers=admin).json()["state"] == "running"
    assert len(client.get("/api/gateway/ota", headers=bearer(token)).json()["assignments"]) == 3
    cancelled = client.post(f"{path}/cancel", headers=admin).json()
    assert cancelled["state"] == "cancelled" and cancelled["counts"] == {"cancelled": 3}
    for action in ("pause", "resume", "cancel"):
        answer = client.post(f"{path}/{action}", headers=admin)
        assert answer.status_code == 409 and "is cancelled" in answer.json()["detail"]
    assert client.post(f"/api/rollouts/{uuid.uuid4()}/pause", headers=admin).status_code == 404
    actions = [e.action for e in session.exec(select(AuditEntry).where(
        AuditEntry.entity_id == rollout["id"]).order_by(AuditEntry.at)).all()]
    assert actions == ["rollout.create", "rollout.pause", "rollout.resume", "rollout.cancel"]
    events = client.get(f"{path}/events", headers=admin).json()
    assert events["total"] == 3 and {e["source"] for e in events["items"]} == {"admin"}


def test_silent_devices_time_out_at_their_deadline_and_the_wave_pauses(
        client, session, box, app, admin):
    site = make_site(session, box)
    [make_device(session, box, site) for _ in range(2)]
    rollout = start(client, admin, make_release(session, app).id, {"site": site.slug},
                    waves=[50, 100], device_deadline_s=60).json()
    engine = app.state.engine

    assert rollouts.tick(engine, utcnow() + timedelta(seconds=30)) == 0
    assert rollouts.tick(engine, utcnow() + timedelta(seconds=61)) == 1

    shown = client.get(f"/api/rollouts/{rollout['id']}", headers=admin).json()
    assert shown["state"] == "paused" and shown["current_wave"] == 0
    assert shown["waves"][0]["counts"] == {"timed_out": 1}
    assert shown["waves"][1]["counts"] == {"pending": 1}  # its wave never started: no deadline
    [device] = client.get(f"/api/rollouts/{rollout['id']}/devices", headers=admin,
                          params={"state": "timed_out"}).json()["items"]
    assert device["reason"] == ("no final state within 60 s of its wave's start "
                                "(last: pending)")
    # An admin accepts the wave's failure: its next wave starts at once.
    resumed = client.post(f"/api/rollouts/{rollout['id']}/resume", headers=admin).json()
    assert resumed["state"] == "running" and resumed["current_wave"] == 1


@pytest.mark.parametrize("caller", ["technician", "site viewer", "site technician",
                                    "site token technician", "gateway"])
def test_only_admins_and_city_wide_viewers_read_rollouts(client, session, box, app, caller):
    callers = make_callers(session, box)
    device = make_device(session, box, callers.site)
    release = make_release(session, app)
    rollout = rollouts.create_rollout(session, CLI, RolloutCreate(
        release_id=release.id, target=RolloutTarget(devices=[device.wire_id])))
    viewer = bearer(callers.tokens["viewer"])
    headers = bearer(callers.tokens[caller])

    for path in ("/api/rollouts", f"/api/rollouts/{rollout.id}",
                 f"/api/rollouts/{rollout.id}/devices", f"/api/rollouts/{rollout.id}/events"):
        assert client.get(path, headers=viewer).status_code == 200, path
        refused = client.get(path, headers=headers)
        assert refused.status_code == 403, path
        assert device.wire_id not in refused.text
    for action in ("pause", "cancel"):
        assert client.post(f"/api/rollouts/{rollout.id}/{action}",
                           headers=viewer).status_code == 403
        assert client.post(f"/api/rollouts/{rollout.id}/{action}",
                           headers=headers).status_code == 403
    assert start(client, viewer, release.id, {"site": callers.site.slug}).status_code == 403
    assert client.get(f"/api/rollouts/{rollout.id}",
                      headers=viewer).json()["state"] == "running"


def test_only_gateways_fetch_assignments(client, session, box, app, admin):
    callers = make_callers(session, box)
    device = make_device(session, box, callers.site)
    rollouts.create_rollout(session, CLI, RolloutCreate(
        release_id=make_release(session, app).id,
        target=RolloutTarget(devices=[device.wire_id])))
    for caller in ("admin", "viewer", "technician", "site technician"):
        answer = client.get("/api/gateway/ota", headers=bearer(callers.tokens[caller]))
        assert answer.status_code == 403 and device.wire_id not in answer.text
    assert client.get("/api/gateway/ota").status_code == 401
    listed = client.get("/api/gateway/ota", headers=bearer(callers.tokens["gateway"])).json()
    assert [a["device_id"] for a in listed["assignments"]] == [device.wire_id]


def test_two_admins_starting_rollouts_of_one_device_at_once_get_one_rollout(
        session, box, app, backend):
    if backend != "postgresql":
        pytest.skip("SQLite has one writer at a time; the row lock is PostgreSQL's")
    site = make_site(session, box)
    devices = [make_device(session, box, site) for _ in range(5)]
    releases = [make_release(session, app) for _ in range(2)]

    def admin_starts(release) -> Callable[[Session], str]:
        def start(own: Session) -> str:
            rollouts.create_rollout(own, CLI, RolloutCreate(
                release_id=release.id,
                target=RolloutTarget(devices=[d.wire_id for d in devices])))
            return "started"
        return start

    outcomes = at_once(app.state.engine, [admin_starts(r) for r in releases])
    assert sorted(outcomes) == ["refused", "started"]
