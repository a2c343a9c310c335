"""Every change leaves an audit entry: who, what, when, before and after; never a secret."""

import json

from sqlmodel import select

from kinhbac.fleet.audit import scrub
from kinhbac.fleet.models import AuditEntry, Role

from .utils import KIT, PASSWORD, bearer, make_gateway, make_site, make_user


def entries(session, action):
    session.expire_all()
    return session.exec(select(AuditEntry).where(AuditEntry.action == action)).all()


def test_every_change_is_audited_with_before_and_after_and_no_secret(client, session):
    admin_user, admin_token = make_user(session, Role.admin, email="admin@example.org")
    admin = bearer(admin_token)
    secrets_seen = [PASSWORD]

    user = client.post("/api/users", headers=admin, json={
        "email": "tech@example.org", "password": "tech password 1", "role": "viewer"}).json()
    client.patch(f"/api/users/{user['id']}", headers=admin,
                 json={"role": "technician", "password": "tech password 2"})
    secrets_seen += ["tech password 1", "tech password 2"]
    login = client.post("/api/auth/login",
                        data={"username": "tech@example.org", "password": "tech password 2"})
    tech = bearer(login.json()["access_token"])
    issued = client.post("/api/tokens", headers=admin,
                         json={"user_id": user["id"], "name": "script"}).json()
    client.delete(f"/api/tokens/{issued['id']}", headers=admin)
    secrets_seen += [login.json()["access_token"], issued["token"]]

    site = client.post("/api/sites", headers=admin, json={
        "name": "Riverside", "slug": "riverside", "wifi_ssid": "kb", "wifi_password": "wifi pass 1",
        "sensor_kit": KIT}).json()
    client.patch(f"/api/sites/{site['id']}", headers=admin,
                 json={"wifi_password": "wifi pass 2", "gateway_port": 7879})
    profile = client.get(f"/api/sites/{site['id']}/profile", headers=admin).json()
    secrets_seen += ["wifi pass 1", "wifi pass 2", profile["claim_key"]]
    gateway = client.post("/api/gateways", headers=admin,
                          json={"name": "gw1", "site_id": site["id"]}).json()
    rotated = client.post(f"/api/gateways/{gateway['id']}/token", headers=admin).json()
    client.delete(f"/api/gateways/{gateway['id']}", headers=admin)
    secrets_seen += [gateway["token"], rotated["token"]]

    device = client.post("/api/devices", headers=tech,
                         json={"mac": "24:0a:c4:00:00:01", "site_id": site["id"]}).json()
    client.patch(f"/api/devices/{device['id']}", headers=tech, json={"tags": ["pump"]})
    again = client.post(f"/api/devices/{device['id']}/reprovision", headers=tech).json()
    client.post(f"/api/devices/{device['id']}/revoke", headers=tech)
    secrets_seen += [device["secret"], again["secret"]]

    [created] = entries(session, "device.create")
    assert (created.actor, created.actor_kind) == ("tech@example.org", "user")
    assert created.entity == "device" and created.entity_id == device["id"]
    assert created.before is None and created.after["mac"] == "24:0a:c4:00:00:01"
    assert created.at.tzinfo is not None
    [tagged] = entries(session, "device.update")
    assert (tagged.before["tags"], tagged.after["tags"]) == ([], ["pump"])
    [reprovisioned] = entries(session, "device.reprovision")
    assert (reprovisioned.before["key_id"], reprovisioned.after["key_id"]) == (1, 2)
    [revoked] = entries(session, "device.revoke")
    assert (revoked.before["state"], revoked.after["state"]) == ("active", "revoked")
    [promoted] = entries(session, "user.update")
    assert (promoted.before["role"], promoted.after["role"]) == ("viewer", "technician")
    assert promoted.after["password_changed"] is True
    assert promoted.actor_id == admin_user.id
    [site_change] = entries(session, "site.update")
    assert (site_change.before["gateway_port"], site_change.after["gateway_port"]) == (None, 7879)
    assert site_change.after["wifi_password_changed"] is True
    [deleted_gateway] = entries(session, "gateway.delete")
    assert deleted_gateway.before["name"] == "gw1" and deleted_gateway.after is None

    everything = session.exec(select(AuditEntry)).all()
    assert {entry.action for entry in everything} == {
        "user.create", "user.update", "api_token.login", "api_token.create", "api_token.delete",
        "site.create", "site.update", "site.profile_read", "gateway.create", "gateway.rotate_token",
        "gateway.delete", "device.create", "device.update", "device.reprovision",
        "device.revoke",
    }
    logged = json.dumps([[entry.before, entry.after] for entry in everything])
    for secret in secrets_seen:
        assert secret not in logged


def test_refused_changes_leave_no_entry(client, session):
    _, token = make_user(session, Role.technician)
    body = {"mac": "24:0a:c4:00:00:01"}
    assert client.post("/api/devices", headers=bearer(token), json=body).status_code == 201
    assert client.post("/api/devices", headers=bearer(token), json=body).status_code == 409
    assert client.post("/api/devices", headers=bearer(token),
                       json={"mac": "bad"}).status_code == 422
    assert len(entries(session, "device.create")) == 1


def test_the_audit_log_is_listed_newest_first_and_filtered(client, session):
    _, token = make_user(session, Role.admin)
    for slug in ("one", "two"):
        client.post("/api/sites", headers=bearer(token), json={"name": slug, "slug": slug})
    page = client.get("/api/audit", headers=bearer(token), params={"action": "site.create"}).json()
    assert page["total"] == 2
    assert [item["after"]["slug"] for item in page["items"]] == ["two", "one"]


def test_scrub_drops_secret_fields_at_any_depth():
    assert scrub({"mac": "m", "secret": "s", "nested": [{"token": "t", "ok": 1}]}) == {
        "mac": "m", "nested": [{"ok": 1}]}


def test_every_read_of_a_site_profile_and_the_gateways_key_reads_are_in_the_log(
        client, session, box):
    """After a laptop or a gateway is lost, the log says whose secrets it could hold."""
    site = make_site(session, box)
    tech, token = make_user(session, Role.technician)
    for _ in range(2):
        assert client.get(f"/api/sites/{site.id}/profile", headers=bearer(token)).status_code \
            == 200
    reads = entries(session, "site.profile_read")
    assert [(e.actor_id, e.entity_id) for e in reads] == [(tech.id, str(site.id))] * 2
    assert all(e.before is None and e.after is None for e in reads)

    # Gateways read their keys every minute: one entry per gateway an hour, not one per read.
    gateway, gateway_token = make_gateway(session, site)
    other, other_token = make_gateway(session, site, name="gw2")
    for _ in range(3):
        assert client.get("/api/gateway/keys", headers=bearer(gateway_token)).status_code == 200
    assert client.get("/api/gateway/keys", headers=bearer(other_token)).status_code == 200
    key_reads = entries(session, "gateway.keys_read")
    assert sorted(str(e.actor_id) for e in key_reads) == sorted([str(gateway.id), str(other.id)])
    assert {e.entity_id for e in key_reads} == {str(site.id)}
