"""The node firmware in the world a site is (issue 12): WiFi that is down or refuses the
password, a gateway name that does not resolve, long outages with reboots, failing sensors,
crash loops and power cuts. Emulated boards run the real firmware; time is real, so a field
node's ten minutes of outage are a window long enough for the old firmware's failure to show
(its watchdog reset came within 15-25 s)."""

import json
import re
import time
from itertools import pairwise
from pathlib import Path

import pytest
from test_firmware import FAST, assert_contiguous, seqs_of, start_nodes, wait_until
from test_firmware_sensors import boot_node

from kinhbac.emulator import launcher, otadata
from kinhbac.emulator.board import DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, WDT_RESET
from kinhbac.emulator.flash import GENERIC_LAYOUT
from kinhbac.emulator.receiver import Receiver
from kinhbac.firmware import config_file, firmware_files
from kinhbac.wire import DROP_CRASHES as CRASHES
from kinhbac.wire import DROP_OUT_OF_RANGE as OUT_OF_RANGE
from kinhbac.wire import DROP_SAFE_MODE as SAFE_MODE
from kinhbac.wire import DROP_WATCHDOG_RESETS as WATCHDOG_RESETS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def receiver():
    with Receiver({}) as rx:
        yield rx


# ----- the watchdog on every path (finding 2) -----


# ----- time across reboots (finding 9) -----


def test_readings_keep_their_unix_time_across_the_reboots_of_a_long_outage(emulator, receiver):
    # A 2-hour outage with the 15-minute no-network reboot, shortened: a reboot every 3 s.
    started_ms = time.time() * 1000
    (node,) = start_nodes(emulator, receiver, no_network_reboot_s=3, good_after_ms=1000)
    wait_until(lambda: any(not r.pre_sync for r in receiver.readings_of(node.device)),
               what="readings of a synced clock")
    emulator.access_point_up(False)
    wait_until(lambda: node.board.boots.count(HARD_RESET) >= 5, timeout=60,
               what="five no-network reboots")
    emulator.access_point_up(True)
    last_boot = len(node.board.boots)
    wait_until(lambda: seqs_of(receiver, node, last_boot), timeout=30,
               what="readings of the boot after the outage")
    for boot in range(1, last_boot):
        wait_until(lambda b=boot: seqs_of(receiver, node, b), timeout=30,
                   what=f"readings of boot {boot}")
    ended_ms = time.time() * 1000
    readings = receiver.readings_of(node.device)
    assert not [r for r in readings if r.unsynced]  # every boot's readings have Unix times
    outage_boots = [r for r in readings if 1 < r.boot < last_boot]
    assert outage_boots and all(r.pre_sync for r in outage_boots)  # flagged: not synced then
    assert all(started_ms - 1000 <= r.time_ms <= ended_ms + 1000 for r in readings)
    times = [r.time_ms for r in readings if r.sensor == 0]  # (boot, seq) order
    steps = [b - a for a, b in pairwise(times)]
    # Time runs on across every reboot, never a jump; backwards only by the resolution of the
    # RTC's read (whole seconds here; the ESP32 port gives microseconds).
    assert min(steps) > -1000 and max(steps) < 10_000, (min(steps), max(steps))


# ----- safe mode, bad boots, reset causes (finding 10) -----


def test_safe_mode_reports_to_the_gateway_and_tries_a_normal_boot_again(emulator, receiver):
    node = launcher.provision(emulator, receiver.port,
                              **(FAST | {"safe_mode_after": 2, "safe_mode_retry_s": 5}))
    receiver.keys[node.key.device_id] = node.key
    node.board.write_files({"/buf": b"not a folder"})  # every start fails making the folder
    node.board.power_on()
    node.board.console.wait_for("safe mode reported to the gateway", timeout=30)
    wait_until(lambda: receiver.config_errors, what="the ERROR with the reason")
    view = receiver.devices[node.device]
    assert view.hello.drops[SAFE_MODE] == 1 and view.hello.drops[CRASHES] == 2
    ((_, detail),) = receiver.config_errors
    assert detail.startswith("safe mode: 2 boots in a row failed; last error: OSError")
    assert receiver.count() == 0  # no readings in safe mode
    # After safe_mode_retry_s: one normal boot, which fails the same way: safe mode again.
    node.board.console.wait_for("trying a normal boot again", timeout=20)
    wait_until(lambda: node.board.console.text().count("SAFE MODE:") == 2, timeout=30,
               what="safe mode again")
    wait_until(lambda: view.hello.drops[SAFE_MODE] == 2, what="the second report")
    assert node.board.boots[:5] == [PWRON_RESET] + [HARD_RESET] * 4


def test_power_cuts_do_not_count_as_failed_boots_and_each_boot_keeps_its_reset_cause(
        emulator, receiver):
    (node,) = start_nodes(emulator, receiver, safe_mode_after=2, watchdog_ms=1000)
    for boot in range(1, 5):  # cut before each boot could prove good (brownouts look alike)
        wait_until(lambda b=boot: seqs_of(receiver, node, b), what=f"readings of boot {boot}")
        node.board.power_cut()
    wait_until(lambda: seqs_of(receiver, node, 5), what="readings of boot 5")
    assert "SAFE MODE" not in node.board.console.text()
    node.board.stall_peripherals()  # a hung sensor bus: the watchdog resets the board
    wait_until(lambda: WDT_RESET in node.board.boots, timeout=10, what="a watchdog reset")
    wait_until(lambda: receiver.devices[node.device].hello.boot == 6, what="boot 6's HELLO")
    assert receiver.devices[node.device].hello.drops[WATCHDOG_RESETS] == 1
    node.board.power_cut(restore=False)
    state = json.loads(node.board.read_file("/state.json"))
    assert state["resets"] == [[1, 1], [2, 1], [3, 1], [4, 1], [5, 1], [6, 3]]  # wire codes
    assert state["bad_boots"] == 2  # boot 5 (stalled, so never good) and boot 6


def after_an_update(board):
    """otadata as esp_ota_set_boot_partition() leaves it: ota_0's image kept, ota_1's new."""
    part = otadata.find(board.flash)
    otadata.write(board.flash, part, 0, otadata.Entry.for_seq(1, otadata.VALID))
    otadata.write(board.flash, part, 1, otadata.Entry.for_seq(2, otadata.NEW))


def test_a_healthy_boot_marks_the_firmware_image_valid_once(emulator, receiver):
    node = launcher.provision(emulator, receiver.port, **(FAST | {"good_after_ms": 1000}))
    receiver.keys[node.key.device_id] = node.key
    after_an_update(node.board)
    node.board.power_on()
    assert otadata.active_entry(node.board.flash) == otadata.Entry.for_seq(
        2, otadata.PENDING_VERIFY)  # on trial: the bootloader rolls it back at the next reset
    node.board.console.wait_for("firmware image marked valid", timeout=20)
    count = receiver.count(node.device)
    receiver.wait_for_count(count + 100, node.device)  # running on, well past the good mark
    assert node.board.app_valid_calls == [0]  # once, in the first boot
    assert otadata.active_entry(node.board.flash) == otadata.Entry.for_seq(2, otadata.VALID)
    node.board.press_reset()
    wait_until(lambda: receiver.devices[node.device].hello.boot == 2, what="boot 2's HELLO")
    assert otadata.active_entry(node.board.flash) == otadata.Entry.for_seq(2, otadata.VALID)


def test_an_image_reset_before_its_boot_is_good_is_rolled_back(emulator, receiver):
    node = launcher.provision(emulator, receiver.port, **(FAST | {"good_after_ms": 60_000}))
    receiver.keys[node.key.device_id] = node.key
    after_an_update(node.board)
    node.board.power_on()
    receiver.wait_for_count(len(launcher.SENSOR_KIT), node.device)
    node.board.power_cut()  # the new image sends readings, but has not lived a minute
    wait_until(lambda: receiver.devices[node.device].hello.boot == 2, what="boot 2's HELLO")
    assert node.board.app_valid_calls == []
    part = otadata.find(node.board.flash)
    assert otadata.read(node.board.flash, part)[1].state == otadata.ABORTED
    assert otadata.active_entry(node.board.flash) == otadata.Entry.for_seq(1, otadata.VALID)


def test_a_build_without_ota_data_takes_the_missing_rollback_as_normal(emulator, receiver):
    settings = FAST | {"good_after_ms": 1000}
    node = launcher.provision(emulator, receiver.port, **settings)
    receiver.keys[node.key.device_id] = node.key
    # A board flashed with the non-OTA ESP32_GENERIC build: no otadata partition, OSError(-261).
    node.board.flash.create(GENERIC_LAYOUT)
    node.board.write_files(firmware_files() | config_file(
        launcher.node_config(node, receiver.port, emulator, **settings)))
    node.board.power_on()
    node.board.console.wait_for("firmware image: this bootloader has no rollback", timeout=20)
    count = receiver.count(node.device)
    receiver.wait_for_count(count + 100, node.device)
    assert node.board.app_valid_calls == [0]
    assert "not marked valid" not in node.board.console.text()
    assert node.board.boots == [PWRON_RESET]


# ----- CONFIG settings that apply at once (finding 10) -----


def saved_seqs(text):
    return [int(m) for m in re.findall(r"saved through seq (\d+)", text)]


def test_config_interval_and_flash_settings_apply_at_once(emulator, receiver):
    (node,) = start_nodes(emulator, receiver, interval_ms=10_000, log_level=3)
    receiver.wait_for_count(len(launcher.SENSOR_KIT), node.device)
    time.sleep(0.5)  # the sampler now sleeps for most of 10 s
    receiver.pending_config[node.device] = {"interval_ms": 50, "flash_every": 4}
    receiver.drop_connections()
    mark = node.board.console.wait_for("CONFIG applied: ", timeout=15)
    count = receiver.count(node.device)
    receiver.wait_for_count(count + 10 * len(launcher.SENSOR_KIT), node.device, timeout=3)
    receiver.acking = False  # readings pile up: every 4 go to flash now, not every 32
    time.sleep(0.3)
    mark = node.board.console.mark()
    time.sleep(1.5)
    saved = saved_seqs(node.board.console.text(mark))
    assert len(saved) >= 3, saved
    assert max(b - a for a, b in pairwise(saved)) <= 8, saved  # at most 2 flushes a round


def test_config_switches_deep_sleep_on_and_off_at_once(emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(20, node.device)
    receiver.pending_config[node.device] = {"deep_sleep_ms": 300}
    receiver.drop_connections()
    node.board.console.wait_for("CONFIG applied: deep_sleep_ms", timeout=15)
    wait_until(lambda: node.board.boots.count(DEEPSLEEP_RESET) >= 2, timeout=20,
               what="deep-sleep cycles")
    receiver.pending_config[node.device] = {"deep_sleep_ms": 0}  # sent at the next wake
    node.board.console.wait_for("deep sleep off: sampling continuously", timeout=20)
    sleeps = node.board.boots.count(DEEPSLEEP_RESET)
    count = receiver.count(node.device)
    receiver.wait_for_count(count + 50 * len(launcher.SENSOR_KIT), node.device, timeout=10)
    assert node.board.boots.count(DEEPSLEEP_RESET) == sleeps  # no sleep since
    assert "CONFIG applied: deep_sleep_ms" in node.board.console.text(0)
    readings = receiver.readings_of(node.device)
    assert {r.boot for r in readings} == {1}  # one boot throughout: on, cycles, off
    assert_contiguous([r.seq for r in readings])


# ----- sensor failures on the console and in HELLO (findings 4 and 5) -----


def test_an_adc_input_out_of_range_is_skipped_named_once_and_counted_in_hello(
        emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    level = next(i for i, e in enumerate(launcher.SENSOR_KIT) if e["name"] == "level")
    receiver.wait_for_count(50, node.device)
    mark = node.board.console.mark()
    node.level.volts = 3.0  # beyond 11 dB's usable 2.45 V: the ADC curve flattens there
    line = re.compile(rf"E kinhbac: sensor level \(sensors\[{level}\]\): \d\.\d{{3}} V is "
                      r"outside the ADC's usable 0\.15-2\.45 V")
    node.board.console.wait_for("is outside the ADC's usable", since=mark)
    wait_until(lambda: receiver.devices[node.device].hello.drops[OUT_OF_RANGE] > 0,
               what="a HELLO carrying the count")
    receiver.wait_for_count(receiver.count(node.device) + 100, node.device)  # what was sent
    before = len([r for r in receiver.readings_of(node.device) if r.sensor == level])
    receiver.wait_for_count(receiver.count(node.device) + 100, node.device)  # 25 rounds more
    after = len([r for r in receiver.readings_of(node.device) if r.sensor == level])
    assert after == before  # skipped, not clipped into a wrong value
    assert len(line.findall(node.board.console.text(mark))) == 1  # once, not per round
    node.level.volts = 1.0
    node.board.console.wait_for(f"sensor level (sensors[{level}]) reads again", since=mark)
    wait_until(lambda: len([r for r in receiver.readings_of(node.device)
                            if r.sensor == level]) > after, what="level readings again")


def test_a_missing_bme280_is_named_once_per_sensor_and_counted_per_sensor(board):
    repl = boot_node(board)  # nothing on the I2C bus
    repl.exec("s = sensors.build_sensors(lambda: i2c, ["
              "{'name': 't', 'kind': 'bme280', 'field': 'temperature'}, "
              "{'name': 'h', 'kind': 'bme280', 'field': 'humidity'}])\n"
              "for _ in range(5):\n    s.sample(lambda i, v: None)\n")
    assert repl.eval("s.errors") == [5, 5]
    text = board.console.text()
    for i, name in enumerate("th"):
        assert text.count(f"E kinhbac: sensor {name} (sensors[{i}]): ") == 1, text
    assert "no BME280 at I2C address 0x76 (1 failed, 0 out of range since boot)" in text


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "kind": "adc", "pin": 4},
     "sensors[0].pin: GPIO4 is no ADC1 pin: it is on ADC2, which cannot be read while WiFi"),
    ({"name": "a", "kind": "adc", "pin": 5},
     "sensors[0].pin: GPIO5 is no ADC1 pin (it has no ADC)"),
    ({"name": "a", "kind": "pulse", "pin": 39, "pull": "down"},
     "sensors[0].pull: GPIO39 has no pull resistor"),
])
def test_sensor_pins_the_esp32_cannot_serve_are_refused_with_the_reason(board, entry, message):
    repl = boot_node(board)
    repl.exec(
        "from node import sensors\n"
        "def refusal(table):\n"
        "    try:\n"
        "        sensors.check_table(table)\n"
        "    except ValueError as e:\n"
        "        return str(e)\n")
    assert repl.eval(f"refusal([{entry!r}])").startswith(message)


# ----- the firmware image (finding 12) -----


def test_firmware_manifest_keeps_the_ports_own_manifest():
    # FROZEN_MANIFEST replaces the port's boards/manifest.py, which freezes _boot.py (the
    # filesystem mount) and asyncio: an image without it boots with neither.
    lines = [line.strip() for line in (REPO / "firmware" / "manifest.py").read_text()
             .splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == 'include("$(PORT_DIR)/boards/manifest.py")'
