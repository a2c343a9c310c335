"""Sites: the profile a node is set up from, with its secrets sealed at rest."""

import sqlalchemy as sa

from kinhbac.fleet.models import Role

from ..utils import KIT, bearer, make_user


def test_site_profile_gives_technicians_the_secrets_that_the_site_keeps_sealed(client, session):
    _, admin = make_user(session, Role.admin)
    _, technician = make_user(session, Role.technician)
    created = client.post("/api/sites", headers=bearer(admin), json={
        "name": "Riverside", "slug": "riverside", "wifi_ssid": "kb-field",
        "wifi_password": "river-password", "gateway_host": "10.1.0.2", "gateway_port": 7878,
        "sensor_kit": KIT,
    })
    assert created.status_code == 201
    site = created.json()
    assert "wifi_password" not in site and "claim_key" not in site

    profile = client.get(f"/api/sites/{site['id']}/profile", headers=bearer(technician)).json()
    assert profile["wifi_password"] == "river-password"
    assert len(profile["claim_key"]) >= 32
    assert profile["sensor_kit"] == KIT
    assert (profile["gateway_host"], profile["gateway_port"]) == ("10.1.0.2", 7878)

    stored = session.execute(sa.text(
        "SELECT wifi_password_enc, claim_key_enc FROM site WHERE slug = 'riverside'")).one()
    assert b"river-password" not in bytes(stored[0])
    assert profile["claim_key"].encode() not in bytes(stored[1])


def test_changing_the_wifi_password_reaches_the_profile(client, session):
    _, admin = make_user(session, Role.admin)
    site = client.post("/api/sites", headers=bearer(admin),
                       json={"name": "Dock", "slug": "dock"}).json()
    assert client.get(f"/api/sites/{site['id']}/profile",
                      headers=bearer(admin)).json()["wifi_password"] is None
    response = client.patch(f"/api/sites/{site['id']}", headers=bearer(admin),
                            json={"wifi_ssid": "dock-net", "wifi_password": "dock-password"})
    assert response.status_code == 200
    profile = client.get(f"/api/sites/{site['id']}/profile", headers=bearer(admin)).json()
    assert (profile["wifi_ssid"], profile["wifi_password"]) == ("dock-net", "dock-password")


def test_bad_site_input_is_named(client, session):
    _, admin = make_user(session, Role.admin)
    cases = [
        ({"name": "X", "slug": "Has Spaces"}, "slug"),
        ({"name": "X", "slug": "x", "gateway_port": 70000}, "gateway_port"),
        ({"name": "X", "slug": "x", "wifi_password": "short"}, "wifi_password"),
        ({"name": "X", "slug": "x", "sensor_kit": [{"name": "t", "kind": "adc"}]}, "sensor_kit"),
        ({"name": "X", "slug": "x", "sensor_kit": [{"name": "t", "kind": "laser"}]},
         "sensor_kit"),
    ]
    for body, field in cases:
        response = client.post("/api/sites", headers=bearer(admin), json=body)
        assert response.status_code == 422, body
        assert field in response.json()["detail"][0]["loc"], response.text
    client.post("/api/sites", headers=bearer(admin), json={"name": "X", "slug": "x"})
    again = client.post("/api/sites", headers=bearer(admin), json={"name": "Y", "slug": "x"})
    assert again.status_code == 409
    assert "slug x" in again.json()["detail"]


def test_gateway_names_are_unique_per_site_and_the_site_must_exist(client, session):
    _, admin = make_user(session, Role.admin)
    site = client.post("/api/sites", headers=bearer(admin),
                       json={"name": "Dock", "slug": "dock"}).json()
    body = {"name": "gw1", "site_id": site["id"]}
    first = client.post("/api/gateways", headers=bearer(admin), json=body)
    assert first.status_code == 201 and first.json()["token"].startswith("kbg_")
    assert client.post("/api/gateways", headers=bearer(admin), json=body).status_code == 409
    unknown = client.post("/api/gateways", headers=bearer(admin), json={
        "name": "gw1", "site_id": "00000000-0000-4000-8000-000000000000"})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "site_id"]
