"""Registering devices by MAC, re-provisioning, revoking, and the registry's list."""

import pytest
import sqlalchemy as sa
from sqlmodel import func, select

from kinhbac.fleet.models import AuditEntry, Device, DeviceTag, Role, utcnow

from ..utils import bearer, make_device, make_site, make_user


@pytest.fixture
def technician(session):
    _, token = make_user(session, Role.technician)
    return bearer(token)


def test_register_returns_the_secret_once_and_stores_it_sealed(client, session, box, technician):
    site = make_site(session, box)
    response = client.post("/api/devices", headers=technician, json={
        "mac": "24:0A:C4:12:34:56", "site_id": str(site.id), "chip": "ESP32-D0WD-V3",
        "flash_size": 4194304, "board": "devkitc", "tags": ["pump", "north"],
        "firmware_version": "0.3.1",
    })
    assert response.status_code == 201, response.text
    created = response.json()
    secret = bytes.fromhex(created["secret"])
    assert len(secret) == 32
    assert created["mac"] == "24:0a:c4:12:34:56"
    assert created["wire_id"] == (b"kb" + bytes.fromhex("240ac4123456")).hex()
    assert created["key_id"] == 1
    assert created["state"] == "active"
    assert created["tags"] == ["north", "pump"]

    shown = client.get(f"/api/devices/{created['id']}", headers=technician).json()
    assert "secret" not in shown
    assert created["secret"] not in client.get("/api/devices", headers=technician).text

    stored = session.execute(
        sa.text("SELECT secret_enc FROM device WHERE mac = :mac"), {"mac": created["mac"]}
    ).scalar_one()
    stored = bytes(stored)
    assert secret not in stored and created["secret"].encode() not in stored


def test_duplicate_mac_is_refused_naming_it_and_nothing_is_written(client, session, technician):
    first = client.post("/api/devices", headers=technician, json={"mac": "24:0a:c4:00:00:01"})
    assert first.status_code == 201
    again = client.post("/api/devices", headers=technician, json={"mac": "24-0A-C4-00-00-01"})
    assert again.status_code == 409
    assert "24:0a:c4:00:00:01" in again.json()["detail"]
    assert session.exec(select(func.count()).select_from(Device)).one() == 1


@pytest.mark.parametrize("mac", ["24:0a:c4:00:00", "not a mac", "25:0a:c4:00:00:01", ""])
def test_malformed_mac_is_a_422_naming_the_field(client, session, technician, mac):
    response = client.post("/api/devices", headers=technician, json={"mac": mac})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "mac"]
    assert session.exec(select(func.count()).select_from(Device)).one() == 0


@pytest.mark.parametrize("body, field", [
    ({"mac": "24:0a:c4:00:00:02", "site_id": "00000000-0000-4000-8000-000000000000"}, "site_id"),
    ({"mac": "24:0a:c4:00:00:02", "tags": ["has space"]}, "tags"),
    ({"mac": "24:0a:c4:00:00:02", "flash_size": -1}, "flash_size"),
    ({}, "mac"),
    ({"mac": "24:0a:c4:00:00:02", "secret": "00" * 32}, "secret"),
    ({"mac": "24:0a:c4:00:00:02", "key_id": 7}, "key_id"),
])
def test_other_bad_input_is_a_422_naming_the_field(client, technician, body, field):
    response = client.post("/api/devices", headers=technician, json=body)
    assert response.status_code == 422
    assert [error["loc"][-1] for error in response.json()["detail"]] == [field]


def test_reprovision_issues_key_id_2_and_a_new_secret(client, session, box, technician):
    device = make_device(session, box)
    response = client.post(f"/api/devices/{device.id}/reprovision", headers=technician)
    assert response.status_code == 200
    again = response.json()
    assert again["key_id"] == 2
    assert again["wire_id"] == device.wire_id
    assert len(bytes.fromhex(again["secret"])) == 32
    assert again["secret"] != device.secret
    assert client.post(f"/api/devices/{device.id}/reprovision",
                       headers=technician).json()["key_id"] == 3


def test_revoke_erases_the_secret_and_twice_is_a_conflict(client, session, box, technician):
    device = make_device(session, box)
    response = client.post(f"/api/devices/{device.id}/revoke", headers=technician)
    assert response.status_code == 200
    assert response.json()["state"] == "revoked"
    session.expire_all()
    assert session.get(Device, device.id).secret_enc is None
    again = client.post(f"/api/devices/{device.id}/revoke", headers=technician)
    assert again.status_code == 409
    assert device.mac in again.json()["detail"]


def test_reprovisioning_a_revoked_device_reactivates_it_with_the_next_key(
        client, session, box, technician):
    device = make_device(session, box)
    client.post(f"/api/devices/{device.id}/revoke", headers=technician)
    again = client.post(f"/api/devices/{device.id}/reprovision", headers=technician).json()
    assert (again["state"], again["key_id"]) == ("active", 2)


def test_unknown_device_is_a_404_and_a_bad_id_a_422(client, technician):
    missing = "00000000-0000-4000-8000-000000000000"
    for method, path in [("GET", f"/api/devices/{missing}"),
                         ("POST", f"/api/devices/{missing}/revoke"),
                         ("POST", f"/api/devices/{missing}/reprovision")]:
        response = client.request(method, path, headers=technician)
        assert response.status_code == 404
        assert missing in response.json()["detail"]
    bad = client.get("/api/devices/123", headers=technician)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["path", "device_id"]


def test_patch_moves_a_device_and_replaces_its_tags(client, session, box, technician):
    first, second = make_site(session, box), make_site(session, box)
    device = make_device(session, box, first, tags=["old", "keep"])
    response = client.patch(f"/api/devices/{device.id}", headers=technician,
                            json={"site_id": str(second.id), "tags": ["keep", "new"]})
    assert response.status_code == 200
    assert response.json()["site_id"] == str(second.id)
    assert response.json()["tags"] == ["keep", "new"]
    assert client.get(f"/api/devices/{device.id}", headers=technician).json()["tags"] == [
        "keep", "new"]


def test_list_is_paginated_and_filtered_by_site_tag_state_and_firmware(
        client, session, box, technician):
    north, south = make_site(session, box), make_site(session, box)
    devices = [
        make_device(session, box, north, tags=["pump"], firmware_version="1.0"),
        make_device(session, box, north, tags=["pump", "meter"], firmware_version="1.1"),
        make_device(session, box, south, tags=["meter"], firmware_version="1.1"),
        make_device(session, box, south, firmware_version="1.0"),
        make_device(session, box),
    ]
    client.post(f"/api/devices/{devices[3].id}/revoke", headers=technician)

    def ids(**params):
        page = client.get("/api/devices", headers=technician, params=params).json()
        return page["total"], {item["id"] for item in page["items"]}

    def of(*indexes):
        return {str(devices[i].id) for i in indexes}

    assert ids() == (5, of(0, 1, 2, 3, 4))
    assert ids(site_id=str(north.id)) == (2, of(0, 1))
    assert ids(tag="meter") == (2, of(1, 2))
    assert ids(tag="pump", site_id=str(north.id), firmware_version="1.1") == (1, of(1))
    assert ids(state="revoked") == (1, of(3))
    assert ids(firmware_version="1.0") == (2, of(0, 3))
    assert ids(mac=devices[2].mac.upper()) == (1, of(2))

    seen = []
    for offset in (0, 2, 4):
        page = client.get("/api/devices", headers=technician,
                          params={"limit": 2, "offset": offset}).json()
        assert (page["total"], page["limit"], page["offset"]) == (5, 2, offset)
        seen += [item["id"] for item in page["items"]]
    assert sorted(seen) == sorted(of(0, 1, 2, 3, 4)) and len(seen) == 5


@pytest.mark.parametrize("params, field", [
    ({"state": "sleeping"}, "state"),
    ({"limit": 0}, "limit"),
    ({"limit": 501}, "limit"),
    ({"offset": -1}, "offset"),
    ({"site_id": "north"}, "site_id"),
    ({"mac": "xx"}, "mac"),
])
def test_bad_list_parameters_are_a_422_naming_them(client, technician, params, field):
    response = client.get("/api/devices", headers=technician, params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", field]


def test_delete_removes_a_device_never_heard_from_with_its_tags(client, session, box,
                                                                  technician):
    device = make_device(session, box, tags=["north"])

    response = client.delete(f"/api/devices/{device.id}", headers=technician)

    assert response.status_code == 204
    session.expire_all()
    assert session.get(Device, device.id) is None
    assert session.exec(select(func.count()).select_from(DeviceTag)).one() == 0
    entry = session.exec(select(AuditEntry).where(AuditEntry.action == "device.delete")).one()
    assert entry.before["mac"] == device.mac and entry.after is None
    again = client.delete(f"/api/devices/{device.id}", headers=technician)
    assert again.status_code == 404


def test_a_device_heard_from_is_revoked_not_deleted(client, session, box, technician):
    device = make_device(session, box)
    stored = session.get(Device, device.id)
    stored.last_seen_at = utcnow()
    session.add(stored)
    session.commit()

    response = client.delete(f"/api/devices/{device.id}", headers=technician)

    assert response.status_code == 409
    assert "revoke it instead" in response.json()["detail"]
    assert session.get(Device, device.id) is not None
