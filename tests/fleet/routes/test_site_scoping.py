"""A technician limited to one site, trying to reach another: its secrets, its devices, its
claims, its lists; and the admin's side of the limits (users, tokens, admins)."""

from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from sqlmodel import Session, func, select

from kinhbac.fleet import sites
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.models import AuditEntry, Device, DeviceProvisioned, Role, Site, User

from ..utils import (
    bearer,
    limit_to,
    make_device,
    make_gateway,
    make_pending_device,
    make_site,
    make_token,
    make_user,
    random_mac,
)


@dataclass
class Town:
    """Two sites with a gateway and a device each (and a pending claim at the away one), an
    admin, and a technician limited to the home site."""

    home: Site
    away: Site
    home_device: DeviceProvisioned
    away_device: DeviceProvisioned
    away_pending_id: object
    admin: dict[str, str]
    technician: User
    limited: dict[str, str]  # the technician's headers


@pytest.fixture
def town(session: Session, box: SecretBox) -> Town:
    home = make_site(session, box, "home")
    away = make_site(session, box, "away", wifi_ssid="away-net", wifi_password="away-password")
    make_gateway(session, home)
    away_gateway, _ = make_gateway(session, away)
    _, admin = make_user(session, Role.admin)
    technician, limited = make_user(session, Role.technician, sites=[home])
    return Town(home=home, away=away, home_device=make_device(session, box, home),
                away_device=make_device(session, box, away),
                away_pending_id=make_pending_device(session, away_gateway),
                admin=bearer(admin), technician=technician, limited=bearer(limited))


def _stored(session: Session, device_id: object) -> Device:
    session.expire_all()
    device = session.get(Device, device_id)
    assert device is not None
    return device


def _audit_entries(session: Session) -> int:
    return session.exec(select(func.count()).select_from(AuditEntry)).one()


def test_another_sites_profile_is_a_404_without_its_wifi_password_or_claim_key(
        client, session, box, town):
    response = client.get(f"/api/sites/{town.away.id}/profile", headers=town.limited)
    assert response.status_code == 404
    assert response.json() == {"detail": f"no site {town.away.id}"}
    assert "away-password" not in response.text
    assert sites.claim_key(box, town.away) not in response.text
    assert "away-net" not in response.text
    own = client.get(f"/api/sites/{town.home.id}/profile", headers=town.limited)
    assert own.status_code == 200
    assert own.json()["claim_key"] == sites.claim_key(box, town.home)


def test_another_sites_device_and_its_readings_are_404s_as_a_missing_device(client, town):
    for path in (f"/api/devices/{town.away_device.id}",
                 f"/api/devices/{town.away_device.id}/readings"):
        response = client.get(path, headers=town.limited)
        assert response.status_code == 404
        assert response.json() == {"detail": f"no device {town.away_device.id}"}
        assert town.away_device.mac not in response.text
    assert client.get(f"/api/devices/{town.home_device.id}",
                      headers=town.limited).status_code == 200


def test_reprovisioning_another_sites_device_leaks_no_secret_and_changes_nothing(
        client, session, town):
    before = _stored(session, town.away_device.id)
    sealed, key_id = before.secret_enc, before.key_id
    response = client.post(f"/api/devices/{town.away_device.id}/reprovision",
                           headers=town.limited)
    assert response.status_code == 404
    assert "secret" not in response.text
    after = _stored(session, town.away_device.id)
    assert (after.secret_enc, after.key_id) == (sealed, key_id)
    assert session.exec(select(AuditEntry).where(
        AuditEntry.action == "device.reprovision")).all() == []


def test_revoking_deleting_or_configuring_another_sites_device_is_a_404(client, session, town):
    device_id = town.away_device.id
    for method, path, body in [
        ("POST", f"/api/devices/{device_id}/revoke", None),
        ("DELETE", f"/api/devices/{device_id}", None),
        ("PUT", f"/api/devices/{device_id}/config", {"settings": {"interval_ms": 1000}}),
        ("PATCH", f"/api/devices/{device_id}", {"tags": ["mine-now"]}),
    ]:
        response = client.request(method, path, headers=town.limited, json=body)
        assert response.status_code == 404, (method, path, response.text)
    stored = _stored(session, device_id)
    assert (stored.state, stored.node_config, stored.tags) == ("active", None, [])


def test_a_device_is_not_moved_to_another_site_nor_out_of_the_callers_sites(
        client, session, box, town):
    home_device = town.home_device.id
    for site_id in (str(town.away.id), None):
        response = client.patch(f"/api/devices/{home_device}", headers=town.limited,
                                json={"site_id": site_id})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "site_id"]
    assert _stored(session, home_device).site_id == town.home.id
    # Nor brought in from another site.
    stolen = client.patch(f"/api/devices/{town.away_device.id}", headers=town.limited,
                          json={"site_id": str(town.home.id)})
    assert stolen.status_code == 404
    assert _stored(session, town.away_device.id).site_id == town.away.id
    # Between two of its own sites it may.
    annex = make_site(session, box, "annex")
    limit_to(session, town.technician, [town.home, annex])
    moved = client.patch(f"/api/devices/{home_device}", headers=town.limited,
                         json={"site_id": str(annex.id)})
    assert moved.status_code == 200
    assert moved.json()["site_id"] == str(annex.id)


def test_another_sites_claims_are_neither_listed_nor_approved(client, session, town):
    pending = client.get("/api/devices", params={"state": "pending"}, headers=town.limited)
    assert pending.json()["total"] == 0
    assert pending.json()["items"] == []
    for decision in ("approve", "reject"):
        response = client.post(f"/api/devices/{town.away_pending_id}/{decision}",
                               headers=town.limited)
        assert response.status_code in (403, 404)
    assert _stored(session, town.away_pending_id).state == "pending"
    assert client.get("/api/devices", params={"state": "pending"},
                      headers=town.admin).json()["total"] == 1


def test_lists_show_and_count_only_the_callers_sites(client, town):
    def listed(path: str, **params: object) -> tuple[int, set[str]]:
        page = client.get(path, params=params, headers=town.limited).json()
        return page["total"], {item["id"] for item in page["items"]}

    assert listed("/api/devices") == (1, {str(town.home_device.id)})
    assert listed("/api/devices", site_id=town.away.id) == (0, set())
    assert listed("/api/devices", mac=town.away_device.mac) == (0, set())
    assert listed("/api/sites") == (1, {str(town.home.id)})
    total, gateways = listed("/api/gateways")
    assert total == 1
    assert listed("/api/gateways", site_id=town.away.id) == (0, set())
    away_gateway = client.get("/api/gateways", params={"site_id": str(town.away.id)},
                              headers=town.admin).json()["items"][0]["id"]
    assert away_gateway not in gateways
    assert client.get(f"/api/gateways/{away_gateway}", headers=town.limited).status_code == 404
    assert client.get(f"/api/sites/{town.away.id}", headers=town.limited).status_code == 404


def test_no_device_is_registered_at_another_site_or_at_none(client, session, town):
    devices = session.exec(select(func.count()).select_from(Device)).one()
    for site_id in (str(town.away.id), None):
        response = client.post("/api/devices", headers=town.limited,
                               json={"mac": random_mac(), "site_id": site_id})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "site_id"]
        assert "secret" not in response.text
    # In the words of a site that does not exist.
    assert client.post("/api/devices", headers=town.limited, json={
        "mac": random_mac(), "site_id": str(town.away.id)}).json()["detail"][0]["msg"] == \
        f"no site {town.away.id}"
    assert session.exec(select(func.count()).select_from(Device)).one() == devices


def test_a_bulk_file_with_a_row_at_another_site_writes_nothing(client, session, town):
    devices = session.exec(select(func.count()).select_from(Device)).one()
    mac = random_mac()
    body = f"mac,site\n{random_mac()},home\n{mac},away\n"
    response = client.post("/api/devices/bulk", headers=town.limited | {
        "Content-Type": "text/csv"}, content=body)
    assert response.status_code == 422, response.text
    assert "secret" not in response.text
    [problem] = response.json()["detail"]
    assert problem["column"] == "site"
    # As an unknown slug is answered: the site's existence is not confirmed.
    assert problem["msg"] == f"{mac}: no site with slug 'away'"
    assert session.exec(select(func.count()).select_from(Device)).one() == devices


def test_a_token_limited_to_one_of_its_users_two_sites_does_not_reach_the_other(
        client, session, town):
    user, user_token = make_user(session, Role.technician, sites=[town.home, town.away])
    home_only, _ = make_token(session, user, sites=[town.home])
    away = f"/api/devices/{town.away_device.id}"
    assert client.get(away, headers=bearer(user_token)).status_code == 200
    assert client.get(away, headers=bearer(home_only)).status_code == 404
    assert client.post(f"{away}/reprovision", headers=bearer(home_only)).status_code == 404
    assert client.get(f"/api/sites/{town.away.id}/profile",
                      headers=bearer(home_only)).status_code == 404
    assert client.get("/api/sites", headers=bearer(home_only)).json()["total"] == 1


def test_a_user_whose_sites_are_reduced_loses_them_on_its_next_request(client, session, town):
    user, token = make_user(session, Role.technician, sites=[town.home, town.away])
    profile = f"/api/sites/{town.away.id}/profile"
    assert client.get(profile, headers=bearer(token)).status_code == 200
    changed = client.patch(f"/api/users/{user.id}", headers=town.admin,
                           json={"site_ids": [str(town.home.id)]})
    assert changed.status_code == 200, changed.text
    assert changed.json()["site_ids"] == [str(town.home.id)]
    assert client.get(profile, headers=bearer(token)).status_code == 404
    # A token limited to a site its user no longer has reaches nothing, not the whole city.
    away_only, _ = make_token(session, user, sites=[town.away])
    listed = client.get("/api/sites", headers=bearer(away_only)).json()
    assert (listed["total"], listed["items"]) == (0, [])


def test_a_limit_cleared_makes_the_user_city_wide(client, town):
    cleared = client.patch(f"/api/users/{town.technician.id}", headers=town.admin,
                           json={"site_ids": []})
    assert cleared.json()["site_ids"] == []
    assert client.get("/api/sites", headers=town.limited).json()["total"] == 2
    null = client.patch(f"/api/users/{town.technician.id}", headers=town.admin,
                        json={"site_ids": None})
    assert null.status_code == 422
    assert null.json()["detail"][0]["loc"] == ["body", "site_ids"]


def test_an_admin_cannot_be_limited_to_sites(client, session, town):
    site_ids = [str(town.home.id)]
    made = client.post("/api/users", headers=town.admin, json={
        "email": "boss@example.org", "password": "a long password", "role": "admin",
        "site_ids": site_ids})
    assert made.status_code == 422
    assert made.json()["detail"][0]["loc"] == ["body", "site_ids"]
    assert "admin" in made.json()["detail"][0]["msg"]
    admin, _ = make_user(session, Role.admin)
    limited = client.patch(f"/api/users/{admin.id}", headers=town.admin,
                           json={"site_ids": site_ids})
    assert limited.status_code == 422
    promoted = client.patch(f"/api/users/{town.technician.id}", headers=town.admin,
                            json={"role": "admin"})
    assert promoted.status_code == 422
    assert promoted.json()["detail"][0]["loc"] == ["body", "site_ids"]
    token = client.post("/api/tokens", headers=town.admin, json={
        "user_id": str(admin.id), "name": "narrow", "site_ids": site_ids})
    assert token.status_code == 422
    # An admin sees every site whatever the rows say (written here past the API's checks).
    _, rows_say_home = make_user(session, Role.admin, sites=[town.home])
    assert client.get("/api/sites", headers=bearer(rows_say_home)).json()["total"] == 2
    # Promotion with the limit cleared in the same change is fine.
    cleared = client.patch(f"/api/users/{town.technician.id}", headers=town.admin,
                           json={"role": "admin", "site_ids": []})
    assert cleared.status_code == 200, cleared.text
    assert client.get("/api/sites", headers=town.limited).json()["total"] == 2


def test_a_user_with_tokens_limited_to_sites_is_not_made_admin(client, session, town):
    make_token(session, town.technician, sites=[town.home])
    response = client.patch(f"/api/users/{town.technician.id}", headers=town.admin,
                            json={"role": "admin", "site_ids": []})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "role"]
    assert "revoke them" in response.json()["detail"][0]["msg"]


def test_users_and_tokens_show_their_sites_and_unknown_sites_are_named(client, session, town):
    missing = "00000000-0000-4000-8000-000000000000"
    refused = client.post("/api/users", headers=town.admin, json={
        "email": "lan@example.org", "password": "a long password", "role": "technician",
        "site_ids": [str(town.home.id), missing]})
    assert refused.status_code == 422
    assert refused.json()["detail"][0] == {
        "loc": ["body", "site_ids"], "msg": f"no site {missing}", "type": "value_error"}
    made = client.post("/api/users", headers=town.admin, json={
        "email": "lan@example.org", "password": "a long password", "role": "technician",
        "site_ids": [str(town.home.id), str(town.away.id), str(town.home.id)]})
    assert made.status_code == 201, made.text
    user = made.json()
    assert sorted(user["site_ids"]) == sorted([str(town.home.id), str(town.away.id)])
    assert client.get(f"/api/users/{user['id']}", headers=town.admin).json()["site_ids"] == \
        user["site_ids"]

    token = client.post("/api/tokens", headers=town.admin, json={
        "user_id": user["id"], "name": "home script", "site_ids": [str(town.home.id)]})
    assert token.status_code == 201, token.text
    assert token.json()["site_ids"] == [str(town.home.id)]
    listed = client.get("/api/tokens", params={"user_id": user["id"]}, headers=town.admin)
    assert listed.json()["items"][0]["site_ids"] == [str(town.home.id)]

    # Beyond its user: the technician limited to home asks for away.
    beyond = client.post("/api/tokens", headers=town.admin, json={
        "user_id": str(town.technician.id), "name": "wider", "site_ids": [str(town.away.id)]})
    assert beyond.status_code == 422
    assert beyond.json()["detail"][0]["loc"] == ["body", "site_ids"]
    assert str(town.away.id) in beyond.json()["detail"][0]["msg"]

    audited = session.exec(select(AuditEntry).where(AuditEntry.action == "user.create")).one()
    assert sorted(audited.after["site_ids"]) == sorted(user["site_ids"])


def test_a_site_someone_is_limited_to_cannot_be_deleted_under_them(session, town):
    """Cascading would leave a user limited to that one site limited to nothing: city-wide."""
    with pytest.raises(sa.exc.IntegrityError):
        session.execute(sa.delete(Site).where(Site.id == town.home.id))
        session.flush()
    session.rollback()
    assert session.get(User, town.technician.id).site_ids == [town.home.id]


def test_registering_another_sites_mac_says_it_is_taken_without_naming_that_device(
        client, session, town):
    """The MAC must be unique, so the refusal says it is taken; but the device at the other
    site stays unseen: neither its id, nor its site, nor its wire id is in the answer."""
    response = client.post("/api/devices", headers=town.limited, json={
        "mac": town.away_device.mac, "site_id": str(town.home.id)})
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert f"a device with MAC {town.away_device.mac} is already registered" in detail
    for secret in (str(town.away_device.id), str(town.away.id), town.away.slug,
                   town.away_device.wire_id):
        assert secret not in response.text
