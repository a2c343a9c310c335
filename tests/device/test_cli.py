"""`kinhbac device register / list / show / revoke / sites` against the real fleet over HTTP:
JSON for scripts, and errors that say what to do next with a non-zero exit."""

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from kinhbac.cli import app

from .conftest import SITE


def random_mac() -> str:
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
    return raw.hex(":")


def device(site, *args: str, token: str | None = None, url: str | None = None):
    env = {"KINHBAC_FLEET_URL": url or site.fleet.url,
           "KINHBAC_FLEET_TOKEN": token or site.technician}
    return CliRunner().invoke(app, ["device", *args], env=env)


def test_register_list_show_revoke_as_json(site):
    mac = random_mac()
    registered = device(site, "register", "--mac", mac.upper().replace(":", "-"), "--site",
                        SITE, "--chip", "ESP32-D0WD-V3", "--flash-size", "4194304", "--tag",
                        "pump", "--json")
    assert registered.exit_code == 0, registered.output
    created = json.loads(registered.stdout)
    assert created["mac"] == mac and created["state"] == "active"
    assert len(created["secret"]) == 64 and created["key_id"] == 1
    assert created["site_id"] == site.site_id and created["flash_size"] == 4194304

    listed = device(site, "list", "--site", SITE, "--json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert row["id"] == created["id"] and "secret" not in row

    for ref in (created["id"], mac, created["wire_id"]):
        shown = device(site, "show", ref, "--json")
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["id"] == created["id"]

    revoked = device(site, "revoke", mac, "--json")
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout)["state"] == "revoked"
    assert json.loads(device(site, "list", "--state", "revoked", "--json").stdout)[0]["id"] \
        == created["id"]
    keys = site.fleet.call("GET", "/api/gateway/keys", site.gateway_token)
    assert keys["devices"] == []

    again = device(site, "revoke", mac)
    assert again.exit_code == 1 and "already revoked" in again.output


def test_plain_output_is_one_line_per_device_and_key_value_for_one(site):
    macs = [random_mac() for _ in range(3)]
    for mac in macs:
        assert device(site, "register", "--mac", mac, "--site", SITE).exit_code == 0
    listed = device(site, "list")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "MAC", "WIRE", "ID", "SITE", "STATE", "ONLINE", "FIRMWARE"]
    assert [line.split()[1] for line in lines[1:]] == macs
    assert all(line.split()[3:6] == [SITE, "active", "no"] for line in lines[1:])
    assert len(json.loads(device(site, "list", "--limit", "2", "--json").stdout)) == 2

    shown = device(site, "show", macs[0]).stdout
    assert f"mac:        {macs[0]}" in shown and f"site:       {SITE}" in shown
    assert "last seen:  never" in shown


def test_register_prints_the_secret_once_and_a_second_registration_is_refused(site):
    mac = random_mac()
    first = device(site, "register", "--mac", mac)
    assert first.exit_code == 0 and "secret:" in first.stdout
    second = device(site, "register", "--mac", mac)
    assert second.exit_code == 1
    assert f"a device with MAC {mac} is already registered" in second.output


def test_wrong_token_is_refused_with_what_to_do(site):
    done = device(site, "list", token="kbt_not-a-real-token")
    assert done.exit_code == 1
    assert "the fleet refused the token (unknown or revoked token)" in done.output
    assert "KINHBAC_FLEET_TOKEN" in done.output
    assert done.stdout == ""


def test_a_viewer_cannot_register_and_is_told_whom_to_ask(site):
    done = device(site, "register", "--mac", random_mac(), token=site.viewer)
    assert done.exit_code == 1
    assert "only admin, technician may do this; the caller is a viewer" in done.output
    assert "ask an admin" in done.output


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:9", "cannot reach the fleet at http://127.0.0.1:9"),
    ("fleet.example.org", "give an http:// or https:// URL"),
])
def test_no_fleet_is_a_clear_error(site, url, message):
    done = device(site, "list", url=url)
    assert done.exit_code == 1 and message in done.output


def test_missing_fleet_address_names_the_option_and_the_variable():
    done = CliRunner().invoke(app, ["device", "list"], env={"KINHBAC_FLEET_URL": "",
                                                            "KINHBAC_FLEET_TOKEN": ""})
    assert done.exit_code == 1
    assert "--fleet-url" in done.output and "KINHBAC_FLEET_URL" in done.output


def test_unknown_device_and_site_are_named(site):
    missing = device(site, "show", random_mac())
    assert missing.exit_code == 1 and "no device with MAC" in missing.output
    nonsense = device(site, "show", "pump-7")
    assert nonsense.exit_code == 1 and "give its id" in nonsense.output
    no_site = device(site, "register", "--mac", random_mac(), "--site", "nowhere")
    assert no_site.exit_code == 1 and "no site 'nowhere'" in no_site.output


def test_site_profiles_are_kept_private_and_listed_without_secrets(site, sites_dir):
    fetched = device(site, "sites", "fetch")
    assert fetched.exit_code == 0, fetched.output
    kept = sites_dir / f"{SITE}.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(sites_dir.stat().st_mode) == 0o700
    profile = json.loads(kept.read_text())
    assert profile["wifi_password"] and profile["claim_key"] and profile["fetched_at"]
    assert not list(sites_dir.glob(".*.tmp"))

    listed = device(site, "sites", "list", "--json")
    [entry] = json.loads(listed.stdout)
    assert entry["slug"] == SITE and "claim_key" not in entry and "wifi_password" not in entry
    remote = device(site, "sites", "list", "--remote")
    assert remote.stdout.split()[0] == SITE


def test_a_plain_http_fleet_on_another_machine_is_refused_unless_allowed(monkeypatch):
    from kinhbac.device.errors import FleetError
    from kinhbac.device.fleet_client import PLAINTEXT_ENV, FleetClient

    monkeypatch.delenv(PLAINTEXT_ENV, raising=False)
    with pytest.raises(FleetError, match=PLAINTEXT_ENV):
        FleetClient("http://fleet.example.org", "kbt_token")
    FleetClient("http://127.0.0.1:8000", "kbt_token").close()  # this machine: fine
    monkeypatch.setenv(PLAINTEXT_ENV, "1")
    FleetClient("http://fleet.example.org", "kbt_token").close()
