"""`kinhbac rollout create / status / pause / resume / cancel / list` against a running fleet
(uvicorn on a thread, SQLite): a release uploaded through the API, devices registered through
the API, and the rollout's commands as an admin types them, in scripts (--json) and in a
terminal (--watch, a real pseudo-terminal)."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest
from helpers.fleet import running_fleet
from typer.testing import CliRunner

from kinhbac import mqtt_contract
from kinhbac.cli import app

from .conftest import ADMIN

VIEWER = ("viewer@example.org", "viewer password 1")
SITE = "north-field"


def rollout(fleet, *args: str, token: str | None = None, url: str | None = None):
    env = {"KINHBAC_FLEET_URL": url or fleet.url, "KINHBAC_FLEET_TOKEN": token or fleet.admin}
    return CliRunner().invoke(app, ["rollout", *args], env=env)


def upload_bundle(fleet, version: str) -> dict:
    """A one-file bundle, uploaded as a console would (multipart, through the API)."""
    answer = fleet.http.post(
        "/api/releases", headers={"Authorization": f"Bearer {fleet.admin}"},
        data={"kind": "bundle", "version": version},
        files=[("file", ("/lib/node/app.mpy", b"M\x06app " + version.encode(),
                         "application/octet-stream"))])
    assert answer.status_code == 201, answer.text
    return answer.json()


def random_mac() -> str:
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
    return raw.hex(":")


def add_site(fleet, slug: str, devices: int, tags: list[str] | None = None) -> list[dict]:
    """A site and `devices` registered devices (active) at it."""
    site = fleet.call("POST", "/api/sites", fleet.admin, 201, json={"name": slug, "slug": slug})
    return [fleet.call("POST", "/api/devices", fleet.admin, 201, json={
        "mac": random_mac(), "site_id": site["id"], "tags": tags or []})
        for _ in range(devices)]


def viewer_token(fleet) -> str:
    user = fleet.call("POST", "/api/users", fleet.admin, 201, json={
        "email": VIEWER[0], "password": VIEWER[1], "role": "viewer"})
    return fleet.call("POST", "/api/tokens", fleet.admin, 201, json={
        "name": "viewer's laptop", "user_id": user["id"]})["token"]


def started(fleet, *args: str) -> dict:
    done = rollout(fleet, "create", *args, "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def test_a_rollout_started_by_version_reads_back_by_short_id_as_json_and_plain(fleet):
    release = upload_bundle(fleet, "0.2.0")
    devices = add_site(fleet, SITE, 3)

    created = started(fleet, "0.2", "--site", SITE, "--waves", "50,100", "--deadline", "2h",
                      "--failure-threshold", "10")

    assert created["release"] == {"id": release["id"], "kind": "bundle", "version": "0.2.0"}
    assert created["target"] == {"site": SITE} and created["state"] == "running"
    assert [(w["percent"], w["size"]) for w in created["waves"]] == [(50, 2), (100, 1)]
    assert (created["total"], created["device_deadline_s"], created["failure_threshold"],
            created["success_threshold"], created["allow_downgrade"]) == (3, 7200, 10, 95, False)
    assert created["created_by"] == ADMIN[0]
    short = created["id"][:8]
    shown = rollout(fleet, "status", short, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == created
    with_devices = json.loads(rollout(fleet, "status", created["id"], "--devices",
                                      "--json").stdout)
    assert {d["device_id"] for d in with_devices["devices"]} == {d["wire_id"] for d in devices}
    assert sorted(d["wave"] for d in with_devices["devices"]) == [0, 0, 1]

    plain = rollout(fleet, "status", short, "--devices")
    assert plain.exit_code == 0, plain.output
    assert f"id:         {created['id']}" in plain.stdout
    assert "state:      running, wave 1 of 2 (50%)" in plain.stdout
    assert "devices:    pending 3 (of 3)" in plain.stdout
    assert "deadline:   2h per device" in plain.stdout
    waves = [line.split()[:3] for line in plain.stdout.splitlines()
             if line.split()[:1] in (["1"], ["2"])]
    assert waves == [["1", "50%", "2"], ["2", "100%", "1"]]
    assert all(d["wire_id"] in plain.stdout for d in devices)

    listed = rollout(fleet, "list")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "RELEASE", "TARGET", "STATE", "CONFIRMED", "FAILED",
                              "CREATED"]
    assert row.split()[:7] == [short, "bundle", "0.2.0", "site", SITE, "running,", "wave"]
    assert json.loads(rollout(fleet, "list", "--state", "paused", "--json").stdout) == []


def test_pause_resume_and_cancel_say_what_changed_and_refuse_what_the_state_forbids(fleet):
    upload_bundle(fleet, "0.3.0")
    devices = add_site(fleet, SITE, 2, tags=["pump"])
    created = started(fleet, "0.3.0", "--device", devices[0]["wire_id"].upper(), "--device",
                      devices[1]["wire_id"])
    assert created["target"] == {"devices": [d["wire_id"] for d in devices]}
    short = created["id"][:8]

    paused = rollout(fleet, "pause", short)
    assert paused.exit_code == 0, paused.output
    assert paused.stdout.startswith(f"paused rollout {short}: bundle 0.3.0 to 2 devices")
    assert f"`kinhbac rollout resume {short}`" in paused.stdout
    state = json.loads(rollout(fleet, "status", short, "--json").stdout)
    assert (state["state"], state["paused_reason"]) == ("paused", f"paused by {ADMIN[0]}")
    shown = rollout(fleet, "status", short)
    assert f"paused: paused by {ADMIN[0]}; see `kinhbac rollout status {short} --devices`" \
        in shown.stderr

    again = rollout(fleet, "pause", short)
    assert again.exit_code == 1
    assert "only a running one can be paused" in again.stderr
    assert f"(the rollout is paused; `kinhbac rollout status {short}` shows it)" in again.stderr

    resumed = rollout(fleet, "resume", short, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["state"] == "running"

    cancelled = rollout(fleet, "cancel", created["id"])
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled 2" in cancelled.stdout
    assert json.loads(rollout(fleet, "status", short, "--json").stdout)["counts"] == {
        "cancelled": 2}
    steps = rollout(fleet, "events", short, "--device", devices[1]["wire_id"])
    assert steps.exit_code == 0, steps.output
    header, step = steps.stdout.splitlines()
    assert header.split() == ["AT", "DEVICE", "STEP", "BY", "REASON"]
    assert step.split()[2:] == [devices[1]["wire_id"], "pending", "->", "cancelled", "admin",
                                "rollout", "cancelled", "by", ADMIN[0]]
    assert len(json.loads(rollout(fleet, "events", short, "--json").stdout)) == 2
    late = rollout(fleet, "resume", short)
    assert late.exit_code == 1 and "only a paused one can be resumed" in late.stderr
    # The devices are free again: a new rollout may take them, by tag this time.
    assert started(fleet, "0.3.0", "--tag", "pump")["total"] == 2


def test_refusals_are_the_fleets_words_and_say_what_to_do_next(fleet):
    upload_bundle(fleet, "0.4.0")
    add_site(fleet, SITE, 1)
    fleet.call("POST", "/api/sites", fleet.admin, 201, json={"name": "Empty", "slug": "empty"})

    unknown = rollout(fleet, "create", "7.7.7", "--site", SITE)
    assert unknown.exit_code == 1
    assert "no release 7.7.7 in the fleet: `kinhbac release list` lists them" in unknown.stderr
    empty = rollout(fleet, "create", "0.4.0", "--site", "empty")
    assert empty.exit_code == 1
    assert "site 'empty' has no active devices" in empty.stderr
    assert "nothing was changed" in empty.stderr
    assert "`kinhbac device list --site empty` lists the site's devices" in empty.stderr
    nowhere = rollout(fleet, "create", "0.4.0", "--site", "atlantis")
    assert nowhere.exit_code == 1 and "no site 'atlantis'" in nowhere.stderr
    untagged = rollout(fleet, "create", "0.4.0", "--tag", "nothing-has-this")
    assert untagged.exit_code == 1 and "no active device has the tag" in untagged.stderr
    stranger = rollout(fleet, "create", "0.4.0", "--device", "6b62000000000001")
    assert stranger.exit_code == 1 and "no device 6b62000000000001" in stranger.stderr
    backwards = rollout(fleet, "create", "0.4.0", "--site", SITE, "--waves", "50,10,100")
    assert backwards.exit_code == 1 and "strictly increasing" in backwards.stderr

    first = started(fleet, "0.4.0", "--site", SITE)
    busy = rollout(fleet, "create", "0.4.0", "--site", SITE)
    assert busy.exit_code == 1
    assert f"in rollout {first['id']} (running) already: cancel it" in busy.stderr

    viewer = viewer_token(fleet)
    refused = rollout(fleet, "create", "0.4.0", "--site", SITE, token=viewer)
    assert refused.exit_code == 1
    assert "starting or changing a rollout needs an admin's token" in refused.stderr
    assert rollout(fleet, "pause", first["id"][:8], token=viewer).exit_code == 1
    # A viewer may read it; a technician may not.
    assert rollout(fleet, "status", first["id"][:8], token=viewer).exit_code == 0
    technician = rollout(fleet, "list", token=fleet.technician)
    assert technician.exit_code == 1
    assert "only admins and viewers not limited to sites may read rollouts" in technician.stderr

    missing = rollout(fleet, "status", "deadbeef")
    assert missing.exit_code == 1
    assert "no rollout's id starts with deadbeef: `kinhbac rollout list`" in missing.stderr
    gone = rollout(fleet, "status", "00000000-0000-4000-8000-000000000000")
    assert gone.exit_code == 1 and "`kinhbac rollout list` lists the rollouts" in gone.stderr
    clear = rollout(fleet, "list", url="http://fleet.example.org")
    assert clear.exit_code == 1 and "use https://" in clear.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["create", "0.4.0"], "give the rollout's target: one of --site SITE"),
    (["create", "0.4.0", "--site", "a", "--tag", "b"], "not --site and --tag"),
    (["create", "0.4.0", "--device", "pump-7"], "give the device's wire id (16 hex digits"),
    (["create", "0.4.0", "--site", "a", "--deadline", "tomorrow"], "'tomorrow' is not a duration"),
    (["create", "0.4.0", "--site", "a", "--waves", "1,ten,100"], "give cumulative percents"),
    (["create", "0.4.0", "--site", "a", "--kind", "zip"], "--kind is bundle or image"),
    (["status", "abc"], "give its id, or its first 8 hex digits"),
    (["status", "deadbeef", "--state", "exploded", "--devices"], "--state is one of pending"),
    (["list", "--state", "stuck"], "--state is one of created, running"),
])
def test_wrong_usage_exits_2_naming_the_problem_before_asking_the_fleet(args, message):
    done = CliRunner().invoke(app, ["rollout", *args], env={
        "KINHBAC_FLEET_URL": "http://127.0.0.1:9", "KINHBAC_FLEET_TOKEN": "kbt_unused"})
    assert done.exit_code == 2, done.output
    assert message in done.stderr
    assert "cannot reach the fleet" not in done.stderr


def test_a_watch_without_a_terminal_prints_changes_and_ends_when_the_rollout_is_paused(fleet):
    upload_bundle(fleet, "0.5.0")
    add_site(fleet, SITE, 4)
    env = {**os.environ, "KINHBAC_FLEET_URL": fleet.url, "KINHBAC_FLEET_TOKEN": fleet.admin}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kinhbac.cli", "rollout", "create", "0.5.0", "--site", SITE,
         "--waves", "25,100", "--watch"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = watcher.stdout.readline()  # "started rollout ...: <id>"
        assert first.startswith("started rollout "), first + watcher.stderr.read()
        rollout_id = first.rsplit(" ", 1)[1].strip()
        assert watcher.stdout.readline().split()[1:] == [
            "running,", "wave", "1", "of", "2", "(25%):", "pending", "1", "(of",
            "1);", "all:", "pending", "4", "(of", "4)"]
        time.sleep(2.5)  # a poll or more with nothing new: no line for it
        fleet.call("POST", f"/api/rollouts/{rollout_id}/pause", fleet.admin)
        out, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    short = rollout_id[:8]
    assert watcher.returncode == 1
    assert [line.split()[1] for line in out.splitlines()] == ["paused,"]
    assert (f"kinhbac rollout: paused: paused by {ADMIN[0]}; see `kinhbac rollout status {short} "
            f"--devices`, then `kinhbac rollout resume {short}` or `kinhbac rollout cancel "
            f"{short}`") in err


@pytest.fixture
def fleet_with_ingest(tmp_path, broker, monkeypatch):
    """The fleet reading update progress from a private broker, as from its gateways."""
    with running_fleet(tmp_path / "fleet", broker.port, monkeypatch, ADMIN) as server:
        server.admin = server.login(*ADMIN)
        yield server


@pytest.fixture
def gateway_publisher(broker):
    """Publishes what a site's gateway publishes, through a paho client."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"gw-{os.getpid()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def test_a_watch_ends_when_a_failure_reported_by_the_gateway_pauses_the_rollout(
        fleet_with_ingest, gateway_publisher):
    fleet = fleet_with_ingest
    release = upload_bundle(fleet, "0.7.0")
    add_site(fleet, SITE, 4)
    env = {**os.environ, "KINHBAC_FLEET_URL": fleet.url, "KINHBAC_FLEET_TOKEN": fleet.admin}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kinhbac.cli", "rollout", "create", "0.7.0", "--site", SITE,
         "--waves", "25,100", "--watch"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = watcher.stdout.readline()
        assert first.startswith("started rollout "), first + watcher.stderr.read()
        rollout_id = first.rsplit(" ", 1)[1].strip()
        [first_wave] = fleet.call("GET", f"/api/rollouts/{rollout_id}/devices", fleet.admin,
                                  params={"wave": 0})["items"]
        device = first_wave["device_id"]

        def report(state: str, reason: str = "") -> None:
            payload = mqtt_contract.ota_progress_payload(
                device=device, site=SITE, gateway="gw1", release_id=release["id"],
                rollout_id=rollout_id, version="0.7.0", state=state,
                ts_ms=int(time.time() * 1000), reason=reason, boot=3)
            topic = mqtt_contract.ota_progress_topic("kinhbac", SITE, device)
            gateway_publisher.publish(topic, payload, qos=1).wait_for_publish(5)

        assert "pending 1 (of 1)" in watcher.stdout.readline()
        report("offered")
        assert "offered 1 (of 1)" in watcher.stdout.readline()  # a line for the change
        report("rolled_back", "trial boot never reached its gateway")
        out, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    short = rollout_id[:8]
    assert watcher.returncode == 1, err
    assert "paused, wave 1 of" in out.splitlines()[-1]
    assert "rolled_back 1 (of 1)" in out.splitlines()[-1]
    assert ("kinhbac rollout: paused: wave 1 of 2 (25% of the target): 1 of its 1 devices failed (0 "
            "failed, 1 rolled back, 0 timed out), past the 5% failure threshold; see "
            f"`kinhbac rollout status {short} --devices`, then `kinhbac rollout resume {short}` "
            f"or `kinhbac rollout cancel {short}`") in err
    failed = json.loads(rollout(fleet, "status", short, "--devices", "--state", "rolled_back",
                                "--json").stdout)["devices"]
    assert [(d["device_id"], d["reason"]) for d in failed] == [
        (device, "trial boot never reached its gateway")]


def test_a_watch_for_scripts_prints_json_lines_and_exits_0_when_the_rollout_completes(
        fleet_with_ingest, gateway_publisher):
    fleet = fleet_with_ingest
    release = upload_bundle(fleet, "0.8.0")
    [only] = add_site(fleet, SITE, 1)
    env = {**os.environ, "KINHBAC_FLEET_URL": fleet.url, "KINHBAC_FLEET_TOKEN": fleet.admin}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kinhbac.cli", "rollout", "create", "0.8.0", "--device",
         only["wire_id"], "--waves", "100", "--watch", "--json"], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        created = json.loads(watcher.stdout.readline())
        assert created["state"] == "running" and created["counts"] == {"pending": 1}
        for state in ("offered", "downloading", "verifying", "installed", "rebooting",
                      "confirmed"):
            payload = mqtt_contract.ota_progress_payload(
                device=only["wire_id"], site=SITE, gateway="gw1", release_id=release["id"],
                rollout_id=created["id"], version="0.8.0", state=state,
                ts_ms=int(time.time() * 1000), boot=1)
            topic = mqtt_contract.ota_progress_topic("kinhbac", SITE, only["wire_id"])
            gateway_publisher.publish(topic, payload, qos=1).wait_for_publish(5)
        out, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    last = json.loads(out.splitlines()[-1])  # every line is one JSON document
    assert (last["state"], last["counts"]) == ("completed", {"confirmed": 1})
    assert "kinhbac rollout: completed: 1 of 1 devices confirmed" in err


def test_a_watch_rides_out_a_fleet_restart_and_ctrl_c_leaves_the_rollout_running(fleet):
    upload_bundle(fleet, "0.9.0")
    add_site(fleet, SITE, 2)
    created = started(fleet, "0.9.0", "--site", SITE)
    env = {**os.environ, "KINHBAC_FLEET_URL": fleet.url, "KINHBAC_FLEET_TOKEN": fleet.admin}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kinhbac.cli", "rollout", "status", created["id"], "--watch"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert "running, wave 1 of" in watcher.stdout.readline()
        fleet.stop()
        note = watcher.stderr.readline()
        assert note.startswith("kinhbac rollout: no answer from the fleet since "), note
        assert note.rstrip().endswith("; trying again")
        fleet.start()
        fleet.call("POST", f"/api/rollouts/{created['id']}/pause", fleet.admin)
        out, _ = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert "paused, wave 1 of" in out and watcher.returncode == 1  # it went on, and saw the pause

    fleet.call("POST", f"/api/rollouts/{created['id']}/resume", fleet.admin)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kinhbac.cli", "rollout", "status", created["id"][:8], "--watch"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert "running, wave 1 of" in watcher.stdout.readline()
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert watcher.returncode == 1
    assert ("stopped watching (Ctrl-C); the rollout goes on: `kinhbac rollout status "
            f"{created['id'][:8]}`") in err
    assert fleet.call("GET", f"/api/rollouts/{created['id']}", fleet.admin)["state"] == "running"


def read_until_exit(fd: int, process: subprocess.Popen, timeout: float) -> str:
    """Everything the process wrote to its terminal until it exited."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed: the process is gone
                break
            seen += chunk
        elif process.poll() is not None:
            break
    return seen.decode(errors="replace")


def test_a_watch_in_a_terminal_draws_every_wave_and_ends_on_cancel(fleet):
    upload_bundle(fleet, "0.6.0")
    add_site(fleet, SITE, 3)
    created = started(fleet, "0.6.0", "--site", SITE)
    env = {**os.environ, "KINHBAC_FLEET_URL": fleet.url, "KINHBAC_FLEET_TOKEN": fleet.admin,
           "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    controller, terminal = pty.openpty()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kinhbac.cli", "rollout", "status", created["id"][:8], "--watch"],
        env=env, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    try:
        time.sleep(3)  # it drew the rollout and polled at least once
        fleet.call("POST", f"/api/rollouts/{created['id']}/cancel", fleet.admin)
        screen = read_until_exit(controller, watcher, timeout=30)
        watcher.wait(10)
    finally:
        watcher.kill()
        os.close(controller)
    assert watcher.returncode == 1, screen
    assert f"rollout {created['id'][:8]}: bundle 0.6.0 to site {SITE}: running" in screen
    assert "\x1b[" in screen  # drawn for a terminal, not plain lines
    for wave in ("1 (1%)", "2 (10%)", "3 (50%)", "4 (100%)"):
        assert wave in screen
    assert "░" in screen and "0/1" in screen
    assert "cancelled: cancelled 3 (of 3); no device is offered the release any more" in screen
