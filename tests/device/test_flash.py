"""`kinhbac device flash` on emulated boards running real MicroPython, with the real fleet,
gateway and broker: the files and identity land, the board comes online, and every failure
leaves nothing registered."""

import json
import os
import stat

import httpx
import pytest
from helpers.fleet import wait_until
from typer.testing import CliRunner

from kinhbac.cli import app
from kinhbac.device.board_session import BoardSession
from kinhbac.device.errors import BoardError, DeviceToolError, FlashError, FleetUnreachable
from kinhbac.device.fleet_client import FleetClient
from kinhbac.device.provision import AutoReset, EmulatedBoardBoot, FlashRequest, Provisioner
from kinhbac.device.site_profiles import SiteProfiles
from kinhbac.emulator import launcher
from kinhbac.emulator.devices import BME280, AnalogSource, PulseSource
from kinhbac.emulator.esp32_image import synthetic_image
from kinhbac.firmware import firmware_version

from .conftest import NODE_SETTINGS, SITE, firmware

SETTINGS = [f"--set={name}={value}" for name, value in NODE_SETTINGS.items()]


def wired_board(emulator, power_on: bool = True):
    """A board with the site's sensor kit attached; powered on, it boots MicroPython to its
    prompt (blank flash)."""
    board = emulator.add_board()
    board.attach_i2c(BME280(0x76))
    board.attach_analog(launcher.LEVEL_PIN, AnalogSource(volts=1.0))
    board.attach_pulses(launcher.PULSE_PIN, PulseSource(launcher.PULSE_PIN))
    if power_on:
        board.power_on()
    return board


def run_cli(site, *args: str):
    env = {"KINHBAC_FLEET_URL": site.fleet.url, "KINHBAC_FLEET_TOKEN": site.technician}
    return CliRunner().invoke(app, ["device", *args], env=env)


def board_config(board) -> dict:
    board.power_cut(restore=False)
    return json.loads(board.read_file("/config.json"))


class Steps:
    """A reporter that records the flow's steps and can act at one of them (a fault)."""

    def __init__(self, at: str | None = None, action=None) -> None:
        self.seen: list[str] = []
        self.at, self.action = at, action

    def step(self, message: str) -> None:
        self.seen.append(message)
        if self.at and self.at in message and self.action:
            self.action()

    def note(self, message: str) -> None:
        self.seen.append(message)

    def progress(self, label: str, total: int):
        return lambda done: None

    def ask(self, message: str) -> None:
        raise AssertionError(f"asked the technician: {message}")


def provisioner(site, board, reporter=None, boot=None, **fields) -> Provisioner:
    fields.setdefault("wait_online_s", 0)
    request = FlashRequest(port=board.tty_path, site=SITE, settings=dict(NODE_SETTINGS),
                           **fields)
    return Provisioner(request, fleet=FleetClient(site.fleet.url, site.technician),
                       profiles=SiteProfiles(), boot=boot or AutoReset(),
                       reporter=reporter or Steps(), firmware=firmware())


def image_file(tmp_path, size: int = 0x6000):
    path = tmp_path / "micropython.bin"
    path.write_bytes(synthetic_image(size, seed=11))
    return path


def test_flash_and_register_end_to_end_with_esptool_and_the_raw_repl(
        emulator, site, gateway, sites_dir, tmp_path):
    board = wired_board(emulator, power_on=False)
    image = image_file(tmp_path)
    gateway.start()
    steps = Steps()
    flow = provisioner(site, board, steps, EmulatedBoardBoot(board), image=image,
                       use_stub=False, wait_online_s=60)

    result = flow.run()

    # The bytes esptool wrote are the image's, where an ESP32 image goes.
    assert board.flash.read(0x1000, image.stat().st_size) == image.read_bytes()
    assert result.online is True
    device = site.fleet.call("GET", f"/api/devices/{result.device['id']}", site.technician)
    assert device["mac"] == board.mac.hex(":") == result.mac
    assert device["chip"] == "ESP32-D0WD-V3 (revision v3.0)"
    assert device["flash_size"] == 4 * 1024 * 1024
    assert device["online"] and device["status"]["firmware"] == firmware_version()
    assert device["status"]["gateway"] == "gw1"
    assert any("image written at 0x1000 and checked (MD5)" in s for s in steps.seen)
    # It booted the copied firmware with its new identity, and the gateway took its frames.
    assert board.console.text().count("kinhbac: starting in") >= 1
    config = board_config(board)
    assert config["device_id"] == device["wire_id"] and config["key_id"] == device["key_id"]


@pytest.mark.parametrize(("fault", "message"), [
    ("no_sync", "did not answer esptool's SYNC: it is not in download mode. Hold BOOT"),
    ("corrupt_write", "the flash does not hold it (MD5 check failed"),
])
def test_flash_failures_are_explained_and_register_nothing(
        emulator, site, sites_dir, tmp_path, fault, message):
    board = wired_board(emulator, power_on=False)
    flow = provisioner(site, board, boot=EmulatedBoardBoot(board, frozenset({fault})),
                       image=image_file(tmp_path), use_stub=False, connect_attempts=1)
    with pytest.raises(FlashError) as failed:
        flow.run()
    assert message in str(failed.value)
    assert site.devices() == []


def test_wrong_port_for_esptool_fails_clearly_and_registers_nothing(site, sites_dir, tmp_path):
    port = tmp_path / "ttyUSB9"
    done = run_cli(site, "flash", "--port", str(port), "--site", SITE, "--image",
                   str(image_file(tmp_path)), "--no-stub")
    assert done.exit_code == 1
    assert f"cannot open serial port {port}" in done.output and "ls /dev/ttyUSB*" in done.output
    assert site.devices() == []


def test_board_running_micropython_gets_its_files_and_identity_and_shows_online(
        emulator, site, gateway, sites_dir):
    board = wired_board(emulator)
    gateway.start()

    done = run_cli(site, "flash", "--port", board.tty_path, "--site", SITE, "--board",
                   "devkitc", "--tag", "north", "--wait", "60", "--json", *SETTINGS)

    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["online"] is True and result["mode"] == "identity"
    assert result["mac"] == board.mac.hex(":")
    device = site.fleet.call("GET", f"/api/devices/{result['device']['id']}", site.technician)
    assert device["state"] == "active" and device["online"]
    assert device["firmware_version"] == firmware_version() == device["status"]["firmware"]
    assert device["site_id"] == site.site_id and device["board"] == "devkitc"
    assert device["tags"] == ["north"]
    assert "secret" not in result["device"]
    # The site's profile is kept on the laptop, readable by its owner only.
    kept = sites_dir / f"{SITE}.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(sites_dir.stat().st_mode) == 0o700
    assert json.loads(kept.read_text())["claim_key"]

    config = board_config(board)
    assert config["device_id"] == device["wire_id"] and config["key_id"] == 1
    assert config["gateway"] == {"host": "127.0.0.1", "port": gateway.port}
    assert config["sensors"] == launcher.SENSOR_KIT
    assert config["interval_ms"] == 50
    for path, data in firmware().items():
        assert board.read_file(path) == data, path


def test_a_board_the_fleet_already_has_is_refused_unless_reprovisioned(
        emulator, site, gateway, sites_dir):
    board = wired_board(emulator)
    gateway.start()
    first = run_cli(site, "flash", "--port", board.tty_path, "--site", SITE, "--wait", "0",
                    "--json", *SETTINGS)
    assert first.exit_code == 0, first.output
    device_id = json.loads(first.stdout)["device"]["id"]

    again = run_cli(site, "flash", "--port", board.tty_path, "--site", SITE, "--wait", "0",
                    *SETTINGS)
    assert again.exit_code == 1
    assert "already has this board" in again.output and "--reprovision" in again.output

    renewed = run_cli(site, "flash", "--port", board.tty_path, "--site", SITE, "--wait", "60",
                      "--reprovision", "--json", *SETTINGS)
    assert renewed.exit_code == 0, renewed.output
    result = json.loads(renewed.stdout)
    assert result["device"]["id"] == device_id and result["device"]["key_id"] == 2
    assert result["online"] is True
    assert len(site.devices()) == 1


def test_wrong_port_for_the_raw_repl_fails_clearly_and_registers_nothing(site, sites_dir, tmp_path):
    done = run_cli(site, "flash", "--port", str(tmp_path / "ttyUSB9"), "--site", SITE)
    assert done.exit_code == 1
    assert f"cannot open serial port {tmp_path / 'ttyUSB9'}" in done.output
    assert "ls /dev/ttyUSB*" in done.output
    assert site.devices() == []


def test_unreachable_fleet_stops_before_the_board_is_touched(emulator, site, sites_dir):
    board = wired_board(emulator)
    board.console.wait_for(">>> ", timeout=15)
    mark = board.console.mark()
    env = {"KINHBAC_FLEET_URL": "http://127.0.0.1:9", "KINHBAC_FLEET_TOKEN": site.technician}
    done = CliRunner().invoke(app, ["device", "flash", "--port", board.tty_path, "--site", SITE],
                              env=env)
    assert done.exit_code == 1
    assert "cannot reach the fleet at http://127.0.0.1:9" in done.output
    assert "--offline" in done.output
    assert board.console.text(mark) == ""  # nothing was sent to the board
    assert site.devices() == []


def test_fleet_lost_after_the_files_are_copied_leaves_nothing_registered(
        emulator, site, sites_dir):
    board = wired_board(emulator)
    flow = provisioner(site, board, Steps(at="firmware files written", action=site.fleet.stop))
    with pytest.raises(FleetUnreachable, match="cannot reach the fleet"):
        flow.run()
    site.fleet.start()  # the same database: did anything get in before it went away?
    assert site.devices() == []
    board.power_cut(restore=False)
    assert board.read_file("/config.json") is None  # boots into safe mode, not half set up


class AnswerLost(httpx.HTTPTransport):
    """Carries requests to the fleet, but loses the answer to the registration, as a link
    that drops after sending does."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = super().handle_request(request)
        if request.method == "POST" and request.url.path == "/api/devices":
            answer.read()
            raise httpx.ReadTimeout("answer lost", request=request)
        return answer


def test_a_registration_whose_answer_is_lost_is_found_and_deleted(emulator, site, sites_dir):
    board = wired_board(emulator)
    flow = provisioner(site, board)
    flow.fleet = FleetClient(site.fleet.url, site.technician, transport=AnswerLost())
    with pytest.raises(DeviceToolError) as failed:
        flow.run()
    assert "did not answer" in str(failed.value) and "Rolled back" in str(failed.value)
    assert site.devices() == []
    deleted = site.fleet.call("GET", "/api/audit", site.admin,
                              params={"action": "device.delete"})["items"]
    assert [entry["before"]["mac"] for entry in deleted] == [board.mac.hex(":")]


def test_config_write_failing_after_registration_leaves_nothing_registered(
        emulator, site, sites_dir):
    board = wired_board(emulator)
    # The board loses power the moment the fleet has registered it: the config never lands.
    flow = provisioner(site, board, Steps(at="registered in the fleet",
                                          action=lambda: board.power_cut(restore=False)))
    flow.recover_timeout_s = 2.0  # it will not come back: no need to wait long for it
    with pytest.raises(DeviceToolError) as failed:
        flow.run()
    message = str(failed.value)
    assert "Rolled back" in message and "nothing is registered" in message
    assert site.devices() == []
    keys = site.fleet.call("GET", "/api/gateway/keys", site.gateway_token)
    assert keys["devices"] == []  # no gateway gets a key for it
    assert board.read_file("/config.json") is None

    # Run again: the board is registered afresh and gets its identity.
    board.power_on()
    result = provisioner(site, board).run()
    assert result.device["state"] == "active"
    assert board_config(board)["key_id"] == result.device["key_id"] == 1


def test_a_failed_reprovisioning_revokes_the_new_key(emulator, site, sites_dir):
    board = wired_board(emulator)
    first = provisioner(site, board).run()
    board.power_cut(restore=False)
    board.power_on()
    # The board loses power the moment the fleet has re-provisioned it: the new key never lands.
    flow = provisioner(site, board, Steps(at="re-provisioned",
                                          action=lambda: board.power_cut(restore=False)),
                       reprovision=True)
    flow.recover_timeout_s = 2.0
    with pytest.raises(DeviceToolError) as failed:
        flow.run()
    assert "Rolled back" in str(failed.value) and "revoked" in str(failed.value)
    [device] = site.devices()
    assert device["id"] == first.device["id"] and device["state"] == "revoked"


def test_offline_flash_writes_the_site_claim_key_and_registers_nothing(
        emulator, site, sites_dir):
    fetched = run_cli(site, "sites", "fetch", SITE)
    assert fetched.exit_code == 0, fetched.output
    profile = SiteProfiles().load(SITE)
    board = wired_board(emulator)
    board.console.wait_for(">>> ", timeout=15)
    mark = board.console.mark()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINHBAC_FLEET")}
    done = CliRunner().invoke(app, ["device", "flash", "--port", board.tty_path, "--site", SITE,
                                    "--offline", "--json", *SETTINGS], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["mode"] == "claim"
    board.console.wait_for("SW_CPU_RESET", since=mark, timeout=15)  # machine.reset() took
    board.console.wait_for("kinhbac:", since=mark, timeout=15)  # and the app started
    config = board_config(board)
    assert config["claim_key"] == profile["claim_key"]
    assert not {"device_id", "key_id", "secret"} & set(config)
    assert config["wifi"] == {"ssid": profile["wifi_ssid"], "password": profile["wifi_password"]}
    assert site.devices() == []


def test_offline_flash_without_a_kept_profile_says_how_to_get_one(emulator, sites_dir):
    board = emulator.add_board()
    done = CliRunner().invoke(app, ["device", "flash", "--port", board.tty_path, "--site", SITE,
                                    "--offline"])
    assert done.exit_code == 1
    assert f"kinhbac device sites fetch {SITE}" in done.output


def test_a_board_that_never_shows_the_prompt_is_reported_with_what_to_check(emulator):
    board = emulator.add_board()  # powered off: nothing answers on its port
    with BoardSession(board.tty_path) as session, pytest.raises(BoardError) as failed:
        session.stop_app(timeout=2.0)
    message = str(failed.value)
    assert "did not reach the MicroPython prompt within 2 s" in message
    assert "--image" in message and "printed nothing" in message


def test_a_board_left_in_the_raw_repl_is_brought_back_though_the_first_ctrl_b_is_lost(emulator):
    board = wired_board(emulator)
    board.console.wait_for(">>> ", timeout=15)
    with BoardSession(board.tty_path) as earlier:  # a session that ended without leaving it
        earlier.stop_app(timeout=15)
    with BoardSession(board.tty_path) as session:
        send = session.link.write
        lost = []

        def lossy_write(data: bytes) -> int | None:
            if not lost and b"\x02" in data:  # the cable loses the first Ctrl-B
                lost.append(data)
                data = data.replace(b"\x02", b"")
            return send(data)

        session.link.write = lossy_write
        session.stop_app(timeout=10)  # a board in the raw REPL answers Ctrl-C with nothing
        assert lost, "the session never sent a Ctrl-B"
        assert len(session.mac()) == 17


def test_a_board_no_gateway_hears_exits_3_saying_what_is_missing(emulator, site, sites_dir):
    board = wired_board(emulator)  # the site's gateway is not running
    done = run_cli(site, "flash", "--port", board.tty_path, "--site", SITE, "--wait", "3",
                   "--json", *SETTINGS)
    assert done.exit_code == 3
    assert "is provisioned (device" in done.output
    assert "no gateway has reported this device yet" in done.output
    assert "The board's last output:" in done.output and "| kinhbac:" in done.output
    result = json.loads(done.stdout)
    assert result["online"] is False and result["device"]["state"] == "active"


def test_an_earlier_status_does_not_count_as_online_after_a_reflash(
        emulator, site, gateway, sites_dir):
    board = wired_board(emulator)
    gateway.start()
    first = run_cli(site, "flash", "--port", board.tty_path, "--site", SITE, "--wait", "60",
                    *SETTINGS)
    assert first.exit_code == 0, first.output
    gateway.stop()  # the fleet still shows the device online, from before
    again = run_cli(site, "flash", "--port", board.tty_path, "--site", SITE, "--wait", "3",
                    "--reprovision", *SETTINGS)
    assert again.exit_code == 3, again.output
    assert "no gateway has heard it since the reset" in again.output


def test_offline_flash_then_approval_gives_the_board_its_own_identity(
        emulator, site, gateway, sites_dir):
    fetched = run_cli(site, "sites", "fetch", SITE)  # earlier, while the fleet was at hand
    assert fetched.exit_code == 0, fetched.output
    board = wired_board(emulator)
    gateway.start()
    offline = {k: v for k, v in os.environ.items() if not k.startswith("KINHBAC_FLEET")}

    done = CliRunner().invoke(app, ["device", "flash", "--port", board.tty_path, "--site", SITE,
                                    "--offline", "--json", "--set=claim_retry_ms=500",
                                    *SETTINGS], env=offline)

    assert done.exit_code == 0, done.output
    wire_id = (b"kb" + board.mac).hex()

    def device() -> dict:
        found = [d for d in site.devices() if d["wire_id"] == wire_id]
        return found[0] if found else {}

    wait_until(lambda: device().get("state") == "pending", 30, "the board pending in the fleet")
    assert device()["key_id"] == 0 and device()["site_id"] == site.site_id
    refused = run_cli(site, "approve", wire_id)  # a technician's token
    assert refused.exit_code == 1, refused.output
    assert "only admin may do this" in refused.output and "needs an admin's token" in \
        refused.output
    approved = CliRunner().invoke(app, ["device", "approve", wire_id, "--json"], env={
        "KINHBAC_FLEET_URL": site.fleet.url, "KINHBAC_FLEET_TOKEN": site.admin})
    assert approved.exit_code == 0, approved.output
    assert json.loads(approved.stdout)["state"] == "active"
    wait_until(lambda: site.fleet.call("GET", f"/api/devices/{device()['id']}",
                                       site.technician)["online"], 30,
               "the approved board online in the fleet")
    assert device()["firmware_version"] == firmware_version()
    config = board_config(board)
    assert (config["device_id"], config["key_id"]) == (wire_id, 1)
    assert "claim_key" not in config and len(config["secret"]) == 64
