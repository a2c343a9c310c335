"""`kinhbac release upload / list / show` against a running fleet: what an admin uploads is
what the fleet signs and a gateway verifies, and every refusal says what to do next."""

import hashlib
import json
from pathlib import Path

from typer.testing import CliRunner

from kinhbac import release_manifest
from kinhbac.admin.client import AdminClient, LocalFile
from kinhbac.cli import app

SLOT_BYTES = 0x180000  # ESP32_GENERIC-OTA's ota_0 and ota_1


def release(fleet, *args: str, token: str | None = None, url: str | None = None):
    env = {"KINHBAC_FLEET_URL": url or fleet.url, "KINHBAC_FLEET_TOKEN": token or fleet.admin}
    return CliRunner().invoke(app, ["release", *args], env=env)


def a_bundle(folder: Path) -> dict[str, bytes]:
    files = {"/lib/node/app.mpy": b"M\x06app" * 900, "/lib/wire.mpy": b"M\x06wire",
             "/lib/node/__init__.mpy": b""}
    for path, data in files.items():
        (folder / path[1:]).parent.mkdir(parents=True, exist_ok=True)
        (folder / path[1:]).write_bytes(data)
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / "lib" / "__pycache__").mkdir()
    (folder / "lib" / "__pycache__" / "x.pyc").write_bytes(b"pyc")
    return files


def test_a_bundle_folder_is_uploaded_signed_and_verified_as_a_gateway_would(fleet, tmp_path):
    files = a_bundle(tmp_path / "app")

    uploaded = release(fleet, "upload", "bundle", "0.2.0", str(tmp_path / "app"), "--json")

    assert uploaded.exit_code == 0, uploaded.output
    assert "left out" in uploaded.stderr and ".DS_Store" in uploaded.stderr
    created = json.loads(uploaded.stdout)
    assert {f["path"]: (f["size"], f["sha256"]) for f in created["files"]} == {
        path: (len(data), hashlib.sha256(data).hexdigest()) for path, data in files.items()}
    site = fleet.call("POST", "/api/sites", fleet.admin, 201, json={"name": "s", "slug": "s"})
    gateway = fleet.call("POST", "/api/gateways", fleet.admin, 201,
                         json={"name": "gw1", "site_id": site["id"]})["token"]
    key = fleet.call("GET", "/api/gateway/keys", gateway)["release_public_key"]
    signed = fleet.call("GET", f"/api/gateway/releases/{created['id']}", gateway)
    assert release_manifest.verify(signed["manifest"].encode(), signed["signature"],
                                   key)["files"] == created["files"]

    listed = release(fleet, "list")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "KIND", "VERSION", "FILES", "SIZE", "CREATED", "BY"]
    assert row.split()[:4] == [created["id"], "bundle", "0.2.0", "3"]
    shown = release(fleet, "show", "0.2")  # compared as a version
    assert shown.exit_code == 0, shown.output
    assert f"id:          {created['id']}" in shown.stdout
    assert hashlib.sha256(files["/lib/wire.mpy"]).hexdigest() in shown.stdout
    assert f"key {release_manifest.fingerprint(key)}" in shown.stdout
    assert json.loads(release(fleet, "show", created["id"], "--json").stdout) == created


def test_an_image_upload_reports_its_progress_and_files_given_one_by_one_go_where_told(
        fleet, tmp_path):
    image = tmp_path / "micropython.bin"
    image.write_bytes(b"\xe9" + bytes(300_000))
    sent = []
    with AdminClient(fleet.url, fleet.admin) as client:
        created = client.upload_release("image", "1.0.0", [LocalFile(image, None, 300_001)],
                                        sent.append)
    assert sum(sent) == 300_001 and len(sent) > 1  # in pieces, as they went
    assert created["files"] == [{"path": "image.bin", "size": 300_001,
                                 "sha256": hashlib.sha256(image.read_bytes()).hexdigest()}]

    (tmp_path / "app.mpy").write_bytes(b"app")
    one = release(fleet, "upload", "bundle", "0.3.0",
                  f"{tmp_path / 'app.mpy'}=/lib/node/app.mpy")
    assert one.exit_code == 0, one.output
    assert "released bundle 0.3.0 as" in one.stdout and "1 file," in one.stdout


def test_refusals_say_what_to_do_next(fleet, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\xe9" + bytes(SLOT_BYTES))
    too_big = release(fleet, "upload", "image", "1.0.0", str(big))
    assert too_big.exit_code == 1
    assert "larger than the OTA slot" in too_big.stderr and "nothing was stored" in too_big.stderr

    a_bundle(tmp_path / "app")
    assert release(fleet, "upload", "bundle", "0.2.0", str(tmp_path / "app")).exit_code == 0
    again = release(fleet, "upload", "bundle", "0.2.0", str(tmp_path / "app"))
    assert again.exit_code == 1 and "give this one a new version" in again.stderr

    technician = release(fleet, "upload", "bundle", "0.9.0", str(tmp_path / "app"),
                         token=fleet.technician)
    assert technician.exit_code == 1 and "releases need an admin's token" in technician.stderr
    assert "need an admin's token" in release(fleet, "list", token=fleet.technician).stderr
    wrong = release(fleet, "list", token="kbt_not-a-token")
    assert wrong.exit_code == 1 and "give it with --token or KINHBAC_FLEET_TOKEN" in wrong.stderr

    climbing = release(fleet, "upload", "bundle", "0.9.0",
                       f"{tmp_path / 'app' / 'lib' / 'wire.mpy'}=/lib/../../boot.py")
    assert climbing.exit_code == 1 and "contains '..'" in climbing.stderr
    loose = release(fleet, "upload", "bundle", "0.9.0", str(tmp_path / "app" / "lib" / "wire.mpy"))
    assert loose.exit_code == 2 and "=/lib/node/wire.mpy" in loose.stderr
    missing = release(fleet, "show", "7.7.7")
    assert missing.exit_code == 1 and "`kinhbac release list` lists them" in missing.stderr
    away = release(fleet, "list", url="http://127.0.0.1:9")
    assert away.exit_code == 1 and "cannot reach the fleet at http://127.0.0.1:9" in away.stderr
    clear = release(fleet, "list", url="http://fleet.example.org")
    assert clear.exit_code == 1 and "use https://" in clear.stderr
    assert release(fleet, "list", "--json").stdout.count('"version"') == 1
