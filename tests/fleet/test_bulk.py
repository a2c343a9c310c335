"""Bulk pre-registration from CSV: all rows or none, every problem by row and column."""

import json

import pytest
from sqlmodel import func, select

from kinhbac.fleet import provisioning
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.errors import Conflict
from kinhbac.fleet.models import AuditEntry, Device, DeviceCreate, Role

from .utils import bearer, make_device, make_gateway, make_site, make_user

HEADER = "mac,site,board,chip,flash_size,tags\n"
CSV = {"Content-Type": "text/csv"}


@pytest.fixture
def technician(session):
    _, token = make_user(session, Role.technician)
    return {**bearer(token), **CSV}


@pytest.fixture
def riverside(session, box):
    return make_site(session, box, slug="riverside")


def counts(session):
    """(devices, audit entries): what a refused file must leave as it found."""
    session.expire_all()
    return (session.exec(select(func.count()).select_from(Device)).one(),
            session.exec(select(func.count()).select_from(AuditEntry)).one())


def post(client, headers, body):
    return client.post("/api/devices/bulk", headers=headers, content=body)


def test_every_row_becomes_an_active_device_with_its_secret_once(
        client, session, box, technician, riverside):
    other = make_site(session, box, slug="old-quarter")
    _, gateway_token = make_gateway(session, riverside)
    before = counts(session)
    body = ("\ufeff" + HEADER  # Excel's "CSV UTF-8" starts with a byte-order mark
            + "24:0A:C4:00:00:01,riverside,devkitc,ESP32-D0WD-V3,4MB,pump; north\r\n"
            + "\r\n"  # blank lines are skipped
            + "24-0a-c4-00-00-02,old-quarter,,,4194304,\r\n"
            + '240ac4000003,,"board, rev 2",,512KB,meter;pump;meter\r\n').encode()
    response = post(client, technician, body)

    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    answer = response.json()
    assert answer["created"] == 3
    first, second, third = answer["devices"]  # in the file's order
    assert [d["mac"] for d in answer["devices"]] == [
        "24:0a:c4:00:00:01", "24:0a:c4:00:00:02", "24:0a:c4:00:00:03"]
    assert (first["site_id"], second["site_id"], third["site_id"]) == (
        str(riverside.id), str(other.id), None)
    assert (first["board"], first["chip"], first["flash_size"]) == (
        "devkitc", "ESP32-D0WD-V3", 4 * 1024 * 1024)
    assert (second["board"], second["flash_size"], third["flash_size"]) == (
        None, 4194304, 512 * 1024)
    assert third["board"] == "board, rev 2"
    assert (first["tags"], second["tags"], third["tags"]) == (
        ["north", "pump"], [], ["meter", "pump"])
    for device in answer["devices"]:
        assert (device["state"], device["key_id"]) == ("active", 1)
        assert device["wire_id"] == "6b62" + device["mac"].replace(":", "")
        assert len(bytes.fromhex(device["secret"])) == 32
    assert counts(session) == (before[0] + 3, before[1] + 3)  # an audit entry per device

    # The secrets are in that answer only, and the site's gateway gets the key it holds.
    listed = client.get("/api/devices", headers=technician).text
    assert all(device["secret"] not in listed for device in answer["devices"])
    keys = client.get("/api/gateway/keys", headers=bearer(gateway_token)).json()["devices"]
    assert keys == [{"device_id": first["wire_id"], "key_id": 1, "secret": first["secret"]}]

    entries = session.exec(select(AuditEntry).where(AuditEntry.action == "device.create")).all()
    assert sorted(entry.entity_id for entry in entries) == sorted(d["id"] for d in
                                                                  answer["devices"])
    assert all(entry.actor_kind == "user" and entry.before is None for entry in entries)
    logged = json.dumps([entry.after for entry in entries])
    assert all(device["secret"] not in logged for device in answer["devices"])
    assert "secret" not in logged


def test_only_mac_is_required_and_an_admin_may_upload_too(client, session):
    _, token = make_user(session, Role.admin)
    response = post(client, {**bearer(token), **CSV}, b"MAC\n24:0a:c4:00:00:01\n")
    assert response.status_code == 201, response.text
    [device] = response.json()["devices"]
    assert (device["site_id"], device["tags"], device["chip"]) == (None, [], None)


# Each file has good rows too: a file with any problem writes none of them.
BAD_FILES = {
    "malformed MAC": (
        HEADER + "24:0a:c4:00:00:01,riverside\n24:0a:c4:00:00\n01:00:5e:00:00:01\n",
        [(3, "mac", "not a MAC address"), (4, "mac", "multicast")]),
    "unknown site": (
        HEADER + "24:0a:c4:00:00:01,riverside\n24:0a:c4:00:00:02,nowhere\n",
        [(3, "site", "no site with slug 'nowhere'")]),
    "duplicate MAC in the file": (
        HEADER + "24:0a:c4:00:00:01\n24:0a:c4:00:00:02\n24-0A-C4-00-00-01\n",
        [(4, "mac", "MAC 24:0a:c4:00:00:01 is also on row 2")]),
    "MAC already registered": (
        HEADER + "24:0a:c4:00:00:01\n02:00:00:00:00:99\n",
        [(3, "mac", "02:00:00:00:00:99 is already registered")]),
    "missing required column": (
        "site,board\nriverside,devkitc\n",
        [(1, "mac", "missing required column 'mac'")]),
    "missing MAC value": (
        HEADER + "24:0a:c4:00:00:01\n,riverside,devkitc\n",
        [(3, "mac", "no MAC")]),
    "bad flash size": (
        HEADER + "24:0a:c4:00:00:01,,,,4MB\n24:0a:c4:00:00:02,,,,four\n"
        "24:0a:c4:00:00:03,,,,-1\n24:0a:c4:00:00:04,,,,4096MB\n",
        [(3, "flash_size", "'four' is not a flash size"),
         (4, "flash_size", "'-1' is not a flash size"),
         (5, "flash_size", "less than or equal to 2147483647")]),
    "bad tag": (
        HEADER + "24:0a:c4:00:00:01,,,,,pump\n24:0a:c4:00:00:02,,,,,pump;has space\n",
        [(3, "tags", "tag 'has space'")]),
    "unknown column": (
        "mac,site,secret\n24:0a:c4:00:00:01,riverside,00\n",
        [(1, "secret", "unknown column 'secret'")]),
    "too many values": (
        "mac,site\n24:0a:c4:00:00:01,riverside\n24:0a:c4:00:00:02,riverside,extra\n",
        [(3, None, "3 values, but the header names 2 columns")]),
    "too long a board": (
        HEADER + "24:0a:c4:00:00:01,,devkitc\n24:0a:c4:00:00:02,," + "b" * 65 + "\n",
        [(3, "board", "at most 64 characters")]),
    "several problems in one row": (
        HEADER + "24:0a:c4:00:00:01\nzz,nowhere,,,big,a b\n",
        [(3, "mac", "not a MAC address"), (3, "site", "no site"),
         (3, "flash_size", "not a flash size"), (3, "tags", "tag 'a b'")]),
}


@pytest.mark.parametrize("body, expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_each_problem_is_named_by_row_and_column_and_nothing_is_written(
        client, session, box, technician, riverside, body, expected):
    make_device(session, box, mac="02:00:00:00:00:99")
    before = counts(session)

    response = post(client, technician, body.encode())

    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert [(p["row"], p["column"]) for p in problems] == [(r, c) for r, c, _ in expected]
    for problem, (row, column, text) in zip(problems, expected, strict=True):
        assert text in problem["msg"], problem
        assert problem["loc"] == ["body", row] + ([column] if column else [])
    assert counts(session) == before


def test_a_long_list_of_problems_is_cut_short_with_a_count(client, session, technician):
    body = HEADER + "not-a-mac\n" * 1500
    response = post(client, technician, body.encode())
    assert response.status_code == 422
    problems = response.json()["detail"]
    assert len(problems) == provisioning.BULK_MAX_ERRORS + 1
    assert problems[-1]["msg"] == "and 500 more problems not listed"
    assert counts(session) == (0, 0)


MALFORMED = {
    "not UTF-8": ((HEADER + "24:0a:c4:00:00:01,café\n").encode("latin-1"),
                  "not UTF-8 text (byte 0xe9 at offset"),
    "UTF-16": ((HEADER + "24:0a:c4:00:00:01\n").encode("utf-16"), "not UTF-8 text"),
    "a spreadsheet file": (b"PK\x03\x04\x14\x00\x06\x00" + bytes(64), "not CSV text"),
    "bad quoting": ((HEADER + '24:0a:c4:00:00:01,"riverside\n').encode(),
                    "not valid CSV at row 2"),
    "empty": (b"", "the first row must name the columns"),
    "header only": (HEADER.encode(), "no devices"),
}


@pytest.mark.parametrize("body, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_file_that_is_not_a_utf8_csv_is_a_422_saying_so(client, session, technician,
                                                          body, message):
    response = post(client, technician, body)
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert message in problem["msg"]
    assert counts(session)[0] == 0


@pytest.mark.parametrize("content_type", [
    None, "application/json", "multipart/form-data; boundary=x", "text/csv; charset=latin-1"])
def test_a_body_not_sent_as_utf8_text_csv_is_a_415(client, session, content_type):
    _, token = make_user(session, Role.technician)
    headers = bearer(token) | ({"Content-Type": content_type} if content_type else {})
    response = post(client, headers, (HEADER + "24:0a:c4:00:00:01\n").encode())
    assert response.status_code == 415
    assert "text/csv" in response.json()["detail"] or "UTF-8" in response.json()["detail"]
    assert counts(session)[0] == 0


def test_a_file_over_1_mib_is_refused_with_413(client, session, technician):
    row = "24:0a:c4:00:00:01,riverside,devkitc,ESP32-D0WD-V3,4MB,pump\n"
    body = (HEADER + row * (provisioning.BULK_MAX_BYTES // len(row) + 1)).encode()
    response = post(client, technician, body)
    assert response.status_code == 413
    assert "larger than 1048576 bytes (1 MiB)" in response.json()["detail"]

    # Sent in chunks without a Content-Length, it is cut off at the limit all the same.
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    assert post(client, technician, chunks).status_code == 413
    assert counts(session)[0] == 0


def test_more_than_10000_devices_are_refused_with_413(client, session, technician):
    rows = "".join(f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}\n" for i in range(10_001))
    response = post(client, technician, ("mac\n" + rows).encode())
    assert response.status_code == 413
    assert "10001 devices in one file, more than 10000" in response.json()["detail"]
    assert counts(session)[0] == 0


def test_a_caller_without_the_role_is_refused_before_the_body_is_read(client, session):
    _, token = make_user(session, Role.viewer)
    response = post(client, {**bearer(token), **CSV}, b"x" * (provisioning.BULK_MAX_BYTES + 1))
    assert response.status_code == 403


def test_a_device_registered_meanwhile_makes_the_whole_file_a_conflict(session, box, riverside):
    devices = provisioning.read_device_csv(
        session, (HEADER + "24:0a:c4:00:00:01,riverside\n24:0a:c4:00:00:02\n").encode())
    assert [device.mac for device in devices] == ["24:0a:c4:00:00:01", "24:0a:c4:00:00:02"]
    provisioning.register_device(session, box, CLI, DeviceCreate(mac="24:0a:c4:00:00:02"))
    before = counts(session)

    with pytest.raises(Conflict, match="nothing was written"):
        provisioning.register_bulk(session, box, CLI, devices)

    assert counts(session) == before
