"""Rotating a site's claim key, from the side of whoever kept the old one: claims under it are
taken for the overlap only, and nothing made with it outlives the overlap. The fleet's clock
is set by the test (`clock`), so no test waits out an overlap."""

import json
from datetime import timedelta

import pytest
from sqlmodel import select

from kinhbac import wire
from kinhbac.claim_keys import fingerprint
from kinhbac.fleet import provisioning, sites
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.models import AuditEntry, ClaimCreate, Gateway, utcnow

from ..utils import a_claim, random_mac

OVERLAP = timedelta(hours=72)  # KINHBAC_CLAIM_KEY_OVERLAP_HOURS by default


class Clock:
    """The fleet's notion of now (kinhbac/fleet/sites.py decides what a key's expiry means)."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock(monkeypatch):
    found = Clock()
    monkeypatch.setattr(sites, "utcnow", found)
    return found


def report(client, gateway, claim):
    answer = client.post("/api/gateway/claims", json=claim, headers=gateway)
    assert answer.status_code == 200, answer.text
    return answer.json()


def listing(client, gateway):
    answer = client.get("/api/gateway/keys", headers=gateway)
    assert answer.status_code == 200, answer.text
    return answer.json()


def rotate(client, site, admin, **body):
    answer = client.post(f"/api/sites/{site.id}/claim-key/rotate", headers=admin,
                         json=body or None)
    assert answer.status_code == 200, answer.text
    return answer.json()


def pending(client, admin):
    return client.get("/api/devices", params={"state": "pending"}, headers=admin).json()


def device_of(client, admin, claim):
    mac = ":".join(claim["device_id"][i:i + 2] for i in range(4, 16, 2))
    [device] = client.get("/api/devices", params={"mac": mac}, headers=admin).json()["items"]
    return device


def key_now(session, box, site) -> str:
    """The site's current claim key, as stored now."""
    session.refresh(site)
    return sites.claim_key(box, site)


def derived(key: str, claim) -> str:
    return wire.claim_secret(key.encode(), bytes.fromhex(claim["device_id"]),
                             bytes.fromhex(claim["nonce"])).hex()


def test_rotation_is_audited_answers_no_key_and_the_profile_says_when(
        client, session, box, site_gateway, admin, clock):
    site, _ = site_gateway
    old = key_now(session, box, site)
    before = client.get(f"/api/sites/{site.id}/profile", headers=admin).json()
    assert before["claim_key_rotated_at"] is None
    clock.advance(timedelta(minutes=1))

    rotated = rotate(client, site, admin)

    profile = client.get(f"/api/sites/{site.id}/profile", headers=admin).json()
    new = profile["claim_key"]
    assert new != old and len(new) >= 32
    assert "claim_key" not in rotated and old not in json.dumps(rotated) \
        and new not in json.dumps(rotated)
    assert rotated["claim_key_rotated_at"] == profile["claim_key_rotated_at"]
    assert profile["updated_at"] > before["updated_at"]
    assert rotated["previous_claim_key_expires_at"].startswith(
        (clock.now + OVERLAP).isoformat()[:16])  # the default overlap
    [entry] = session.exec(select(AuditEntry).where(
        AuditEntry.action == "site.rotate_claim_key")).all()
    assert (entry.entity_id, entry.after["overlap_hours"]) == (str(site.id), 72)
    assert entry.before["claim_key_rotated_at"] is None
    logged = json.dumps([entry.before, entry.after])
    assert old not in logged and new not in logged


def test_a_claim_under_the_old_key_is_taken_during_the_overlap_and_refused_after(
        client, session, box, site_gateway, admin, clock):
    site, gateway = site_gateway
    old = key_now(session, box, site)
    rotated = rotate(client, site, admin)
    new = key_now(session, box, site)

    keys = listing(client, gateway)
    assert keys["claim_key"] == new
    assert keys["previous_claim_key"] == {"claim_key": old,
                                          "expires_at": rotated["previous_claim_key_expires_at"]}
    assert report(client, gateway, a_claim(signed_with=old))["state"] == "pending"
    assert report(client, gateway, a_claim(signed_with=new))["state"] == "pending"

    clock.advance(OVERLAP + timedelta(seconds=1))

    assert "previous_claim_key" not in listing(client, gateway)
    late = report(client, gateway, a_claim(signed_with=old))
    assert late["state"] == "refused" and "no longer takes" in late["detail"]
    assert report(client, gateway, a_claim(signed_with=new))["state"] == "pending"
    assert pending(client, admin)["total"] == 3


def test_a_stolen_old_key_after_rotation_and_overlap_cannot_make_a_pending_device(
        client, session, box, site_gateway, admin, clock):
    """Someone kept a laptop's profile (or a board) from before the rotation: past the overlap,
    however many claims a gateway reports under it, none becomes a device, and a pending claim
    it made during the overlap cannot be approved into an identity."""
    site, gateway = site_gateway
    stolen = key_now(session, box, site)
    rotate(client, site, admin, overlap_hours=1)
    during = a_claim(signed_with=stolen)
    assert report(client, gateway, during)["state"] == "pending"
    clock.advance(timedelta(hours=1, seconds=1))

    for _ in range(20):
        assert report(client, gateway, a_claim(signed_with=stolen))["state"] == "refused"
    again = report(client, gateway, during)  # the pending one, asked again
    assert again["state"] == "refused"

    assert [d["wire_id"] for d in pending(client, admin)["items"]] == [during["device_id"]]
    device = device_of(client, admin, during)
    approved = client.post(f"/api/devices/{device['id']}/approve", headers=admin)
    assert approved.status_code == 409
    assert "set the board up again" in approved.json()["detail"]
    assert listing(client, gateway)["devices"] == []


def test_a_claim_made_under_the_old_key_is_approved_with_the_secret_that_key_derives(
        client, session, box, site_gateway, admin, clock):
    """The board flashed with the old profile holds only the old key: its identity must be the
    one the old key derives, or it could never verify it."""
    site, gateway = site_gateway
    old = key_now(session, box, site)
    rotate(client, site, admin)
    new = key_now(session, box, site)
    under_old, under_new = a_claim(signed_with=old), a_claim(signed_with=new)
    for claim in (under_old, under_new):
        report(client, gateway, claim)
        device = device_of(client, admin, claim)
        assert client.post(f"/api/devices/{device['id']}/approve",
                           headers=admin).status_code == 200

    devices = {row["device_id"]: row["secret"] for row in listing(client, gateway)["devices"]}
    assert devices == {under_old["device_id"]: derived(old, under_old),
                       under_new["device_id"]: derived(new, under_new)}
    for claim in (under_old, under_new):
        assert report(client, gateway, claim)["state"] == "approved"


def test_the_old_key_cannot_repin_a_claim_made_under_the_new_one(
        client, session, box, site_gateway, admin, clock):
    """The nonce of a board's CLAIM is readable on the air: replayed under the old key, it would
    make the approval derive a secret the old key's holder knows. Refused and audited."""
    site, gateway = site_gateway
    old = key_now(session, box, site)
    rotate(client, site, admin)
    new = key_now(session, box, site)
    board = a_claim(signed_with=new)
    report(client, gateway, board)

    replayed = report(client, gateway, dict(board, claim_key_fingerprint=fingerprint(
        old.encode())))

    assert replayed["state"] == "refused" and "another claim key" in replayed["detail"]
    [conflict] = session.exec(select(AuditEntry).where(
        AuditEntry.action == "device.claim_conflict")).all()
    assert conflict.after["claim_key_fingerprint"] == fingerprint(old.encode())
    device = device_of(client, admin, board)
    client.post(f"/api/devices/{device['id']}/approve", headers=admin)
    [row] = listing(client, gateway)["devices"]
    assert row["secret"] == derived(new, board)


def test_a_rotation_with_no_overlap_ends_the_old_key_at_once(client, session, box, site_gateway,
                                                             admin, clock):
    site, gateway = site_gateway
    old = key_now(session, box, site)

    rotated = rotate(client, site, admin, overlap_hours=0)

    assert rotated["previous_claim_key_expires_at"] is None
    assert "previous_claim_key" not in listing(client, gateway)
    assert report(client, gateway, a_claim(signed_with=old))["state"] == "refused"
    assert pending(client, admin)["total"] == 0


def test_a_second_rotation_drops_the_first_key_at_once(client, session, box, site_gateway, admin,
                                                       clock):
    site, gateway = site_gateway
    first = key_now(session, box, site)
    rotate(client, site, admin)
    second = key_now(session, box, site)
    rotate(client, site, admin)

    assert listing(client, gateway)["previous_claim_key"]["claim_key"] == second
    assert report(client, gateway, a_claim(signed_with=first))["state"] == "refused"
    assert report(client, gateway, a_claim(signed_with=second))["state"] == "pending"


def test_a_claim_recorded_before_any_rotation_is_approved_under_the_key_it_was_made_with(
        client, session, box, site_gateway, admin, clock):
    """Claims from before fingerprints (or from a gateway that sends none) count as made under
    the key current then: a rotation pins them to it."""
    site, gateway = site_gateway
    old = key_now(session, box, site)
    legacy = a_claim(signed_with=None)
    gateway_row = session.exec(select(Gateway).where(Gateway.site_id == site.id)).one()
    provisioning.record_claim(session, gateway_row, CLI, ClaimCreate(**legacy))
    rotate(client, site, admin)

    device = device_of(client, admin, legacy)
    assert client.post(f"/api/devices/{device['id']}/approve", headers=admin).status_code == 200

    [row] = listing(client, gateway)["devices"]
    assert row["secret"] == derived(old, legacy)


@pytest.mark.parametrize("body, problem", [
    ({"overlap_hours": -1}, "greater than or equal to 0"),
    ({"overlap_hours": 24 * 31}, "less than or equal to 720"),
    ({"claim_key": "mine"}, "Extra inputs are not permitted"),
])
def test_a_rotation_request_out_of_bounds_changes_nothing(client, session, box, site_gateway,
                                                          admin, body, problem):
    site, _ = site_gateway
    old = key_now(session, box, site)
    answer = client.post(f"/api/sites/{site.id}/claim-key/rotate", headers=admin, json=body)
    assert answer.status_code == 422 and problem in answer.text
    assert client.get(f"/api/sites/{site.id}/profile", headers=admin).json()["claim_key"] == old


def test_a_claim_naming_a_key_the_site_never_had_is_refused(client, site_gateway, admin):
    _, gateway = site_gateway
    answer = report(client, gateway, a_claim(signed_with="a key of another site entirely"))
    assert answer["state"] == "refused"
    assert pending(client, admin)["total"] == 0


def test_after_a_leak_an_admin_lists_the_devices_whose_identity_the_leaked_key_derives(
        client, session, box, site_gateway, admin, clock):
    """docs/security.md, "When a claim key leaks", step 5: the devices to re-provision are
    those set up by a claim under a key other than the profile's current one."""
    site, gateway = site_gateway
    leaked = key_now(session, box, site)
    under_leaked = a_claim(signed_with=leaked)
    report(client, gateway, under_leaked)
    device = device_of(client, admin, under_leaked)
    assert client.post(f"/api/devices/{device['id']}/approve", headers=admin).status_code == 200
    registered = client.post("/api/devices", headers=admin,
                             json={"mac": random_mac(), "site_id": str(site.id)}).json()
    rotate(client, site, admin, overlap_hours=0)

    current = client.get(f"/api/sites/{site.id}/profile", headers=admin).json()
    assert current["claim_key_fingerprint"] == fingerprint(key_now(session, box, site).encode())
    claimed = client.get("/api/devices", headers=admin,
                         params={"site_id": str(site.id), "from_claim": "true"}).json()
    suspects = [d["id"] for d in claimed["items"]
                if d["claim_key_fingerprint"] != current["claim_key_fingerprint"]]
    assert suspects == [device["id"]]
    others = client.get("/api/devices", headers=admin,
                        params={"site_id": str(site.id), "from_claim": "false"}).json()
    assert [d["id"] for d in others["items"]] == [registered["id"]]
    assert others["items"][0]["claim_key_fingerprint"] is None

    # Re-provisioned: its secret is random now, so it leaves the list.
    assert client.post(f"/api/devices/{device['id']}/reprovision",
                       headers=admin).status_code == 200
    claimed = client.get("/api/devices", headers=admin,
                         params={"site_id": str(site.id), "from_claim": "true"}).json()
    assert claimed["total"] == 0
