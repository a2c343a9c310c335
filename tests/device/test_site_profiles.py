"""Site profiles kept on a technician's laptop, from the side of whoever finds the laptop or
keeps using an old copy: a profile is refused and deleted once expired (also offline), and one
whose site changed since (its claim key rotated) is reported as stale when the fleet can be
asked. The laptop's clock is set by the test where time matters."""

import json
import stat
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from kinhbac.cli import app
from kinhbac.device import site_profiles
from kinhbac.device.errors import DeviceToolError
from kinhbac.device.site_profiles import PROFILE_DAYS_ENV, SiteProfiles, staleness

from .conftest import SITE, FleetSite

PROFILE = {"id": "7c1e4c8e-0000-4000-8000-000000000001", "slug": SITE,
           "claim_key": "a site claim key, long enough", "wifi_password": "field-password",
           "sensor_kit": [], "updated_at": "2026-12-01T10:00:00Z",
           "claim_key_rotated_at": None}


@pytest.fixture
def laptop_clock(monkeypatch):
    """Moves the laptop's clock: `laptop_clock(days=8)`."""
    real = datetime

    class Moved(datetime):
        offset = timedelta()

        @classmethod
        def now(cls, tz=None):
            return real.now(tz) + cls.offset

    monkeypatch.setattr(site_profiles, "datetime", Moved)

    def move(**delta):
        Moved.offset += timedelta(**delta)

    return move


def test_kept_profiles_are_the_owners_alone_and_say_when_they_expire(sites_dir):
    profiles = SiteProfiles(sites_dir)
    path = profiles.save(PROFILE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sites_dir.stat().st_mode) == 0o700
    kept = json.loads(path.read_text())
    fetched = datetime.fromisoformat(kept["fetched_at"])
    assert datetime.fromisoformat(kept["expires_at"]) - fetched == timedelta(days=7)
    assert profiles.load(SITE)["claim_key"] == PROFILE["claim_key"]


def test_a_kept_profile_past_its_expiry_is_refused_deleted_and_says_how_to_fetch_it_again(
        sites_dir, laptop_clock):
    profiles = SiteProfiles(sites_dir)
    path = profiles.save(PROFILE)
    laptop_clock(days=7, seconds=1)

    with pytest.raises(DeviceToolError) as refused:
        profiles.load(SITE)

    message = str(refused.value)
    assert "expired at" in message and f"kinhbac device sites fetch {SITE}" in message
    assert PROFILE_DAYS_ENV in message
    assert not path.exists()  # not usable offline, not even by reading the file again
    with pytest.raises(DeviceToolError, match="no profile of site"):
        profiles.load(SITE)


def test_a_shorter_setting_applies_to_profiles_already_kept(sites_dir, laptop_clock,
                                                           monkeypatch):
    SiteProfiles(sites_dir).save(PROFILE)  # stamped for 7 days
    laptop_clock(days=2)
    monkeypatch.setenv(PROFILE_DAYS_ENV, "1")
    with pytest.raises(DeviceToolError, match="kept 1 days"):
        SiteProfiles(sites_dir).load(SITE)


@pytest.mark.parametrize("stamps", [
    {"fetched_at": None, "expires_at": None},  # kept by hand, or by a broken tool
    {"fetched_at": (datetime.now(UTC) + timedelta(days=30)).isoformat()},  # a clock set back
    {"fetched_at": "yesterday"},
])
def test_a_profile_without_a_trustworthy_fetch_time_is_refused(sites_dir, stamps):
    profiles = SiteProfiles(sites_dir)
    path = profiles.save(PROFILE)
    path.write_text(json.dumps(json.loads(path.read_text()) | stamps))
    with pytest.raises(DeviceToolError, match="no usable fetch time"):
        profiles.load(SITE)
    assert not path.exists()


@pytest.mark.parametrize("value", ["0", "-3", "a week", "400"])
def test_a_wrong_profile_lifetime_is_named(monkeypatch, value):
    monkeypatch.setenv(PROFILE_DAYS_ENV, value)
    with pytest.raises(DeviceToolError, match=PROFILE_DAYS_ENV):
        SiteProfiles()


def test_staleness_names_the_rotation_and_the_command():
    kept = dict(PROFILE)
    assert staleness(kept, dict(PROFILE)) is None
    later = (datetime.now(UTC) + timedelta(hours=72)).isoformat()
    rotated = dict(PROFILE, claim_key_rotated_at="2026-12-05T09:00:00Z",
                   updated_at="2026-12-05T09:00:00Z", previous_claim_key_expires_at=later)
    said = staleness(kept, rotated)
    assert said.startswith("stale: the site's claim key was rotated at 2026-12-05T09:00:00")
    assert f"can claim only until {later}" in said
    assert said.endswith(f"run `kinhbac device sites fetch {SITE}` to refresh")
    over = dict(rotated, previous_claim_key_expires_at=None)
    assert "cannot claim" in staleness(kept, over)
    wifi = dict(PROFILE, updated_at="2026-12-02T10:00:00Z")
    assert staleness(kept, wifi).startswith("stale: the site changed at 2026-12-02T10:00:00")


# ---- the command line, against the real fleet over HTTP


def device(fleet, token, *args):
    env = {"KINHBAC_FLEET_URL": fleet.url, "KINHBAC_FLEET_TOKEN": token}
    return CliRunner().invoke(app, ["device", *args], env=env)


@pytest.fixture
def fleet_site(fleet):
    return FleetSite(fleet, ssid="kinhbac-field", password="field-password",
                     gateway_port=7878)


def test_a_stale_profile_is_reported_when_the_fleet_can_be_asked(fleet_site, sites_dir):
    fleet, technician = fleet_site.fleet, fleet_site.technician
    assert device(fleet, technician, "sites", "fetch", SITE).exit_code == 0
    listed = device(fleet, technician, "sites", "list")
    assert listed.exit_code == 0 and "stale" not in listed.output
    assert "expires " in listed.output

    rotated = fleet.call("POST", f"/api/sites/{fleet_site.site_id}/claim-key/rotate",
                         fleet_site.admin)

    listed = device(fleet, technician, "sites", "list")
    said = f"stale: the site's claim key was rotated at {rotated['claim_key_rotated_at'][:19]}"
    assert said in listed.output
    assert f"run `kinhbac device sites fetch {SITE}` to refresh" in listed.output
    [entry] = json.loads(device(fleet, technician, "sites", "list", "--json").stdout)
    assert entry["stale"].startswith("stale:") and "claim_key" not in entry
    flashed = device(fleet, technician, "flash", "--port", str(sites_dir / "no-such-port"),
                     "--site", SITE, "--offline")
    # Said before anything else (Rich wraps the line to the terminal's width).
    assert flashed.exit_code == 1 and said in " ".join(flashed.output.split())

    assert device(fleet, technician, "sites", "fetch", SITE).exit_code == 0
    assert "stale" not in device(fleet, technician, "sites", "list").output


def test_an_expired_profile_cannot_flash_offline_even_with_the_fleet_away(
        fleet_site, sites_dir, laptop_clock):
    fleet, technician = fleet_site.fleet, fleet_site.technician
    assert device(fleet, technician, "sites", "fetch", SITE).exit_code == 0
    fleet.stop()
    laptop_clock(days=8)

    flashed = device(fleet, technician, "flash", "--port", str(sites_dir / "no-such-port"),
                     "--site", SITE, "--offline")

    assert flashed.exit_code == 1
    said = " ".join(flashed.output.split())
    assert "expired at" in said and f"kinhbac device sites fetch {SITE}" in said
    assert "no-such-port" not in flashed.output  # refused before the board is touched
    assert not (sites_dir / f"{SITE}.json").exists()
    listed = device(fleet, technician, "sites", "list")
    assert "no site profiles" in listed.output
