"""Rollouts from the admin's side and the attacker's: who may start, steer and read them, what a
rollout may target, and what each gateway is told to offer (its own site's devices only)."""

import hashlib
import uuid

import pytest
from sqlmodel import select

from kinhbac.fleet import rollouts
from kinhbac.fleet.models import (
    AuditEntry,
    DeviceStatus,
    Role,
    RolloutDevice,
    RolloutState,
    utcnow,
)

from ..utils import bearer, make_callers, make_device, make_gateway, make_release, make_site, \
    make_user


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
