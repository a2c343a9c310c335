"""The claim path and CONFIG for nodes, as the API serves them: a gateway reports a node that
holds only its site's claim key; an admin approves (the device gets the identity its claim
derives) or rejects it (it is kept out); staff set settings that gateways deliver."""

import os
from collections.abc import Callable

import pytest
from sqlmodel import Session, col, select

from kinhbac import wire
from kinhbac.fleet import provisioning, sites
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.models import AuditEntry, Device, Role
from kinhbac.fleet.rate_limits import ClaimLimiter

from ..utils import (a_claim, at_once, bearer, make_device, make_gateway, make_pending_device,
                     make_site, make_user)


@pytest.fixture
def technician(session):
    return bearer(make_user(session, Role.technician)[1])


def listing(client, gateway):
    response = client.get("/api/gateway/keys", headers=gateway)
    assert response.status_code == 200, response.text
    return response.json()


def device_by_wire_id(client, caller, wire_id):
    mac = ":".join(wire_id[i:i + 2] for i in range(4, 16, 2))
    [device] = client.get("/api/devices", params={"mac": mac}, headers=caller).json()["items"]
    return device


def test_a_claim_makes_a_pending_device_at_the_gateways_site(client, session, box, site_gateway,
                                                             admin):
    site, gateway = site_gateway
    claim = a_claim(fw_version="0.1.0")

    answer = client.post("/api/gateway/claims", json=claim, headers=gateway)

    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "pending"
    pending = client.get("/api/devices", params={"state": "pending"}, headers=admin).json()
    [device] = pending["items"]
    assert (device["wire_id"], device["site_id"], device["firmware_version"], device["key_id"]) \
        == (claim["device_id"], str(site.id), "0.1.0", 0)
    assert claim["device_id"] not in [row["device_id"] for row in listing(client, gateway)
                                      ["devices"]]
    entry = session.exec(select(AuditEntry).where(AuditEntry.action == "device.claim")).one()
    assert (entry.actor_kind, entry.entity_id) == ("gateway", device["id"])


def test_approval_gives_the_identity_the_claim_derives(client, session, box, site_gateway, admin):
    site, gateway = site_gateway
    claim = a_claim()
    client.post("/api/gateway/claims", json=claim, headers=gateway)
    device = device_by_wire_id(client, admin, claim["device_id"])

    approved = client.post(f"/api/devices/{device['id']}/approve", headers=admin)

    assert approved.status_code == 200, approved.text
    assert (approved.json()["state"], approved.json()["key_id"]) == ("active", 1)
    keys = listing(client, gateway)
    claim_key = sites.claim_key(box, site)
    assert keys["claim_key"] == claim_key
    expected = wire.claim_secret(claim_key.encode(), bytes.fromhex(claim["device_id"]),
                                 bytes.fromhex(claim["nonce"]))
    assert {"device_id": claim["device_id"], "key_id": 1, "secret": expected.hex()} \
        in keys["devices"]
    assert keys["claims"] == [{"device_id": claim["device_id"], "nonce": claim["nonce"],
                               "key_id": 1}]
    again = client.post("/api/gateway/claims", json=claim, headers=gateway).json()
    assert again["state"] == "approved"
    assert session.exec(select(AuditEntry).where(AuditEntry.action == "device.approve")).one()


def test_a_second_claim_with_another_nonce_cannot_hijack_a_pending_device(
        client, session, site_gateway, admin):
    """Someone else holding the site's claim key claims a pending device's id: refused, and
    shown to the admins; the approval goes to the first claim's board."""
    _, gateway = site_gateway
    first = a_claim()
    hijack = dict(first, nonce=os.urandom(16).hex())
    client.post("/api/gateway/claims", json=first, headers=gateway)
    answer = client.post("/api/gateway/claims", json=hijack, headers=gateway).json()
    assert answer["state"] == "refused" and "another nonce" in answer["detail"]
    device = device_by_wire_id(client, admin, first["device_id"])

    conflicts = client.get("/api/audit", params={"action": "device.claim_conflict",
                                                 "entity_id": device["id"]},
                           headers=admin).json()["items"]
    assert [(c["after"]["nonce"], c["after"]["pending_nonce"]) for c in conflicts] == [
        (hijack["nonce"], first["nonce"])]
    client.post(f"/api/devices/{device['id']}/approve", headers=admin)
    assert listing(client, gateway)["claims"][0]["nonce"] == first["nonce"]
    assert client.post("/api/gateway/claims", json=hijack,
                       headers=gateway).json()["state"] == "refused"


def test_another_sites_gateway_cannot_move_a_pending_device(client, session, box, site_gateway,
                                                            admin):
    site, gateway = site_gateway
    other_site = make_site(session, box)
    _, other = make_gateway(session, other_site, name="gw-other")
    claim = a_claim()
    client.post("/api/gateway/claims", json=claim, headers=gateway)
    moved = client.post("/api/gateway/claims", json=claim, headers=bearer(other)).json()
    assert moved["state"] == "refused" and "another site" in moved["detail"]
    assert device_by_wire_id(client, admin, claim["device_id"])["site_id"] == str(site.id)


def test_a_claim_key_cannot_flood_a_site_with_pending_devices(client, session, site_gateway,
                                                               admin):
    """The cap on pending devices, behind the rate limits (raised here: at the default limits
    a gateway takes two minutes to reach it; test_claim_limits.py attacks those)."""
    _, gateway = site_gateway
    cap = client.app.state.settings.max_pending_claims_per_site
    # (put back after the test by the session fixture)
    client.app.state.claim_limiter = ClaimLimiter(per_gateway=cap + 1, per_site=cap + 1)
    for _ in range(cap):
        assert client.post("/api/gateway/claims", json=a_claim(),
                           headers=gateway).json()["state"] == "pending"
    refused = client.post("/api/gateway/claims", json=a_claim(), headers=gateway).json()
    assert refused["state"] == "refused" and "pending claims" in refused["detail"]
    pending = client.get("/api/devices", params={"state": "pending", "limit": 1},
                         headers=admin).json()
    assert pending["total"] == cap


def test_rejection_keeps_the_device_out(client, session, site_gateway, admin):
    _, gateway = site_gateway
    claim = a_claim()
    client.post("/api/gateway/claims", json=claim, headers=gateway)
    device = device_by_wire_id(client, admin, claim["device_id"])

    rejected = client.post(f"/api/devices/{device['id']}/reject", headers=admin)

    assert rejected.status_code == 200 and rejected.json()["state"] == "rejected"
    again = client.post("/api/gateway/claims", json=dict(claim, nonce=os.urandom(16).hex()),
                        headers=gateway).json()
    assert again["state"] == "rejected"
    keys = listing(client, gateway)
    assert claim["device_id"] not in [row["device_id"] for row in keys["devices"]]
    assert keys["claims"] == []
    late = client.post(f"/api/devices/{device['id']}/approve", headers=admin)
    assert late.status_code == 409
    assert "only a pending claim can be approved" in late.json()["detail"]


def test_a_claim_cannot_take_over_a_registered_device(client, session, box, site_gateway,
                                                      admin):
    site, gateway = site_gateway
    registered = make_device(session, box, site)
    claim = a_claim(mac=registered.mac)

    answer = client.post("/api/gateway/claims", json=claim, headers=gateway).json()

    assert answer["state"] == "refused"
    assert "already has an identity" in answer["detail"]
    session.expire_all()
    device = session.get(Device, registered.id)
    assert (device.state, device.key_id, device.claim_nonce) == ("active", 1, None)
    refused = client.post(f"/api/devices/{registered.id}/approve", headers=admin)
    assert refused.status_code == 409


def test_an_approved_claim_is_refused_at_another_sites_gateway(client, session, box,
                                                               site_gateway, admin):
    _, gateway = site_gateway
    _, elsewhere = make_gateway(session, make_site(session, box))
    claim = a_claim()
    client.post("/api/gateway/claims", json=claim, headers=gateway)
    device = device_by_wire_id(client, admin, claim["device_id"])
    client.post(f"/api/devices/{device['id']}/approve", headers=admin)

    answer = client.post("/api/gateway/claims", json=claim, headers=bearer(elsewhere)).json()

    assert answer["state"] == "refused"
    assert listing(client, bearer(elsewhere))["claims"] == []


def test_reprovisioning_a_claimed_device_ends_its_claim(client, site_gateway, admin):
    _, gateway = site_gateway
    claim = a_claim()
    client.post("/api/gateway/claims", json=claim, headers=gateway)
    device = device_by_wire_id(client, admin, claim["device_id"])
    client.post(f"/api/devices/{device['id']}/approve", headers=admin)

    again = client.post(f"/api/devices/{device['id']}/reprovision", headers=admin).json()

    keys = listing(client, gateway)
    assert keys["claims"] == []
    assert {"device_id": claim["device_id"], "key_id": 2, "secret": again["secret"]} \
        in keys["devices"]


@pytest.mark.parametrize("field, value, problem", [
    ("device_id", "0011223344556677", "6b62 and its MAC"),
    ("device_id", "6b62ffffffffffff", "multicast"),
    ("nonce", "abc", "32 lower-case hex digits"),
    ("fw_version", "x" * 65, "at most 64"),
])
def test_a_malformed_claim_is_refused_naming_the_field(client, session, site_gateway, field,
                                                       value, problem):
    _, gateway = site_gateway
    response = client.post("/api/gateway/claims", json=a_claim() | {field: value},
                           headers=gateway)

    assert response.status_code == 422, response.text
    assert field in response.text and problem in response.text
    assert session.exec(select(Device)).all() == []


def test_only_gateways_report_claims_and_only_admins_decide(client, session, site_gateway,
                                                            admin, technician):
    _, gateway = site_gateway
    assert client.post("/api/gateway/claims", json=a_claim(), headers=admin).status_code == 403
    claim = a_claim()
    client.post("/api/gateway/claims", json=claim, headers=gateway)
    device = device_by_wire_id(client, admin, claim["device_id"])
    for decision in ("approve", "reject"):
        refused = client.post(f"/api/devices/{device['id']}/{decision}", headers=technician)
        assert refused.status_code == 403
    assert device_by_wire_id(client, admin, claim["device_id"])["state"] == "pending"


# ---- CONFIG for nodes


def test_settings_reach_the_gateways_listing_and_clear(client, session, box, site_gateway,
                                                       technician):
    site, gateway = site_gateway
    device = make_device(session, box, site)

    response = client.put(f"/api/devices/{device.id}/config",
                          json={"settings": {"interval_ms": 5000, "log_level": 3}},
                          headers=technician)

    assert response.status_code == 200, response.text
    assert response.json()["node_config"] == {"interval_ms": 5000, "log_level": 3}
    assert listing(client, gateway)["configs"] == [
        {"device_id": device.wire_id, "settings": {"interval_ms": 5000, "log_level": 3}}]
    client.put(f"/api/devices/{device.id}/config", json={"settings": {}}, headers=technician)
    assert listing(client, gateway)["configs"] == []
    actions = session.exec(select(AuditEntry.action).where(AuditEntry.entity_id == str(device.id))
                           ).all()
    assert actions.count("device.config") == 2


@pytest.mark.parametrize("settings, problem", [
    ({"secret": "00" * 32}, "not settable on a node: secret"),
    ({"interval_ms": "fast"}, "interval_ms must be a whole number"),
    ({"sensors": [{"name": "t", "kind": "adc"}]}, "needs a pin"),
    ({"sensors": [{"name": f"s{i}", "kind": "adc", "pin": 34, "scale": 1.0, "note": "x" * 20}
                  for i in range(20)]}, "a CONFIG frame carries 1300 at most"),
])
def test_settings_a_node_cannot_take_are_refused_and_nothing_is_stored(
        client, session, box, site_gateway, technician, settings, problem):
    site, gateway = site_gateway
    device = make_device(session, box, site)

    response = client.put(f"/api/devices/{device.id}/config", json={"settings": settings},
                          headers=technician)

    assert response.status_code == 422, response.text
    assert problem in response.text
    assert listing(client, gateway)["configs"] == []


@pytest.mark.parametrize("decisions", [("approve", "approve"), ("approve", "reject")])
def test_two_admins_deciding_one_claim_at_once_make_one_decision(session, box, app, backend,
                                                                 decisions):
    """Two admins at two consoles click at the same moment: one decision is made and audited,
    the other is told the device is no longer pending. Without the row lock both read
    'pending' and both wrote: two approvals gave the device two key ids, one of them never
    delivered to the board."""
    if backend != "postgresql":
        pytest.skip("SQLite has one writer at a time; the row lock is PostgreSQL's")
    gateway, _ = make_gateway(session, make_site(session, box))
    device_id = make_pending_device(session, gateway)

    def admin_decides(decision: str) -> Callable[[Session], str]:
        def decide(own: Session) -> str:
            if decision == "approve":
                provisioning.approve_claim(own, app.state.secret_box, CLI, device_id)
            else:
                provisioning.reject_claim(own, CLI, device_id)
            return decision
        return decide

    outcomes = at_once(app.state.engine, [admin_decides(d) for d in decisions])

    assert len(outcomes) == 2 and outcomes.count("refused") == 1, outcomes
    [made] = [o for o in outcomes if o != "refused"]
    session.expire_all()
    device = session.get(Device, device_id)
    assert device.state.value == ("active" if made == "approve" else "rejected")
    assert device.key_id == (1 if made == "approve" else 0)
    entries = session.exec(select(AuditEntry).where(
        AuditEntry.entity_id == str(device_id),
        col(AuditEntry.action).in_(["device.approve", "device.reject"]))).all()
    assert [e.action for e in entries] == [f"device.{made}"]
