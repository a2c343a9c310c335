"""What a gateway fetches with its token: its own site's active device keys, in the shape of
the gateway's key file."""

import json

from kinhbac import wire
from kinhbac.fleet.models import Role
from kinhbac.gateway.keys import FileKeyStore

from ..utils import bearer, make_device, make_gateway, make_site, make_user


def test_keys_come_in_the_key_file_shape_that_the_gateway_loads(client, session, box, tmp_path):
    site = make_site(session, box)
    _, token = make_gateway(session, site)
    devices = [make_device(session, box, site) for _ in range(2)]

    response = client.get("/api/gateway/keys", headers=bearer(token))

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    listing = response.json()
    assert list(listing) == ["devices", "claim_key", "claims", "configs"]
    assert all(list(row) == ["device_id", "key_id", "secret"] for row in listing["devices"])
    assert sorted((row["device_id"], row["key_id"], row["secret"]) for row in listing["devices"]) \
        == sorted((d.wire_id, 1, d.secret) for d in devices)

    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps(listing))
    store = FileKeyStore(key_file)
    for device in devices:
        key = store.lookup(bytes.fromhex(device.wire_id), 1)
        assert isinstance(key, wire.Key)
        assert store.lookup(bytes.fromhex(device.wire_id), 2) == wire.UNKNOWN_KEY


def test_a_gateway_sees_only_its_own_sites_devices(client, session, box):
    north, south = make_site(session, box), make_site(session, box)
    _, north_token = make_gateway(session, north)
    _, south_token = make_gateway(session, south)
    at_north = make_device(session, box, north)
    at_south = make_device(session, box, south)
    make_device(session, box)  # at no site: no gateway gets it

    def listed(token):
        rows = client.get("/api/gateway/keys", headers=bearer(token)).json()["devices"]
        return [row["device_id"] for row in rows]

    assert listed(north_token) == [at_north.wire_id]
    assert listed(south_token) == [at_south.wire_id]


def test_revoked_devices_vanish_from_the_listing(client, session, box):
    site = make_site(session, box)
    _, token = make_gateway(session, site)
    kept, revoked = make_device(session, box, site), make_device(session, box, site)
    staff = _staff(session)
    assert client.post(f"/api/devices/{revoked.id}/revoke", headers=staff).status_code == 200

    rows = client.get("/api/gateway/keys", headers=bearer(token)).json()["devices"]

    assert [row["device_id"] for row in rows] == [kept.wire_id]


def test_a_reprovisioned_device_is_listed_with_its_new_key(client, session, box):
    site = make_site(session, box)
    _, token = make_gateway(session, site)
    device = make_device(session, box, site)
    again = client.post(f"/api/devices/{device.id}/reprovision", headers=_staff(session)).json()

    [row] = client.get("/api/gateway/keys", headers=bearer(token)).json()["devices"]

    assert row == {"device_id": device.wire_id, "key_id": 2, "secret": again["secret"]}


def test_a_rotated_or_removed_gateway_token_stops_working(client, session, box):
    site = make_site(session, box)
    gateway, old = make_gateway(session, site)
    admin = _staff(session, admin=True)
    new = client.post(f"/api/gateways/{gateway.id}/token", headers=admin).json()["token"]

    assert client.get("/api/gateway/keys", headers=bearer(old)).status_code == 401
    assert client.get("/api/gateway/keys", headers=bearer(new)).status_code == 200

    assert client.delete(f"/api/gateways/{gateway.id}", headers=admin).status_code == 204
    assert client.get("/api/gateway/keys", headers=bearer(new)).status_code == 401



def _staff(session, admin=False):
    _, token = make_user(session, Role.admin if admin else Role.technician)
    return bearer(token)
