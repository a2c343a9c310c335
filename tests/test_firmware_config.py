"""CONFIG frames on the node (firmware/node/config.py, app.py): checked whole, the sensor table
included, before anything is saved or stopped; refused with an ERROR naming the field."""

import json

import pytest
from test_firmware import FAST, start_nodes, wait_until
from test_firmware_pulses import WATER, run_meter, water
from test_firmware_sensors import boot_node

from kinhbac import wire
from kinhbac.emulator import launcher
from kinhbac.emulator.board import PWRON_RESET
from kinhbac.emulator.receiver import Receiver


class RecordingReceiver(Receiver):
    """The test receiver, keeping the reason code of every ERROR a node sends."""

    def __init__(self) -> None:
        super().__init__({})
        self.errors: list[tuple[int, int, str]] = []  # reason, ref, detail

    def _handle(self, msg: wire.Message) -> list[tuple[str, object]]:
        if msg.type == wire.ERROR_UP:
            self.errors.append((msg.reason, msg.ref, msg.detail))  # type: ignore[attr-defined]
        return super()._handle(msg)


@pytest.fixture
def receiver():
    with RecordingReceiver() as rx:
        yield rx


def kit_names():
    return [(e["name"], e["unit"]) for e in launcher.SENSOR_KIT]


def test_bad_sensor_table_is_refused_naming_the_field_and_the_old_sensors_keep_counting(
        emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(20, node.device)
    before = run_meter(receiver, node, 6)
    # A second meter on the water meter's pin: the old firmware saved this table, stopped
    # the running sensors, then failed to build it, and crash-looped at the next boot.
    bad = launcher.SENSOR_KIT + [
        {"name": "flow", "unit": "L", "kind": "pulse", "pin": launcher.PULSE_PIN}]
    receiver.pending_config[node.device] = {"sensors": bad, "interval_ms": 40}
    receiver.drop_connections()  # the CONFIG goes out on the next connection
    wait_until(lambda: receiver.errors, what="the node's ERROR answer")
    reason, ref, detail = receiver.errors[0]
    assert reason == wire.BAD_PAYLOAD
    assert ref > 0  # the CONFIG's counter
    assert detail == "sensors[5].pin: GPIO27 is already used by sensors[4]"
    # Nothing of it applied (not even interval_ms), and the water meter still counts.
    after = run_meter(receiver, node, 6)
    assert before < after <= before + 6 * launcher.SENSOR_KIT[WATER]["per_pulse"]
    assert "CONFIG applied" not in node.board.console.text()
    assert receiver.devices[node.device].hello.sensors == kit_names()
    node.board.power_cut()  # and the next boot runs the old table
    wait_until(lambda: water(receiver, node, boot=2), what="boot-2 water readings")
    assert node.board.boots == [PWRON_RESET, PWRON_RESET]
    assert receiver.devices[node.device].hello.boot == 2
    assert receiver.devices[node.device].hello.sensors == kit_names()
    node.board.power_cut(restore=False)
    saved = json.loads(node.board.read_file("/config.json"))
    assert saved["sensors"] == launcher.SENSOR_KIT
    assert saved["interval_ms"] == FAST["interval_ms"]


def test_new_sensor_table_starts_at_once_and_carries_the_pulse_total_over(
        emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(20, node.device)
    before = run_meter(receiver, node, 6)
    pulses = round(before / launcher.SENSOR_KIT[WATER]["per_pulse"])
    # Without the level probe, and the meter now in whole litres per pulse.
    table = [e for e in launcher.SENSOR_KIT if e["kind"] != "adc"]
    table = [dict(e, per_pulse=1.0) if e["kind"] == "pulse" else e for e in table]
    receiver.pending_config[node.device] = {"sensors": table}
    receiver.drop_connections()
    node.board.console.wait_for("CONFIG applied: sensors")
    wait_until(lambda: receiver.devices[node.device].hello.sensors
               == [(e["name"], e["unit"]) for e in table], what="a HELLO with the new table")
    index = next(i for i, e in enumerate(table) if e["kind"] == "pulse")
    count = receiver.count(node.device)
    receiver.wait_for_count(count + 20, node.device)
    newest = [r for r in receiver.readings_of(node.device) if r.sensor == index][-1]
    assert newest.value == pulses * 1.0  # the same pulses, counted on by the new table
    assert receiver.errors == []


# A node's config as the board checks it: identity, WiFi, gateway, the sensor kit.
BASE = {
    "device_id": "6b62240ac4000001", "key_id": 1, "secret": "00" * 32,
    "wifi": {"ssid": "site"}, "gateway": {"host": "10.0.0.2", "port": 7700},
    "sensors": launcher.SENSOR_KIT,
}


@pytest.mark.parametrize("settings, unsupported, message", [
    ({"wifi": {"ssid": "elsewhere"}}, True, "wifi: not changeable remotely"),
    ({"interval_ms": 0}, False, "interval_ms must be a whole number from 1 to 86400000"),
    ({"interval_ms": True}, False, "interval_ms must be a whole number"),
    ({"sensors": [{"name": "a", "kind": "adc", "pin": 25}]}, False,
     "sensors[0].pin: GPIO25 is no ADC1 pin"),
    ({"sensors": [{"name": "a", "kind": "adc", "pin": 34}, {"name": "a", "kind": "adc",
                                                            "pin": 35}]},
     False, "sensors[1].name: 'a' is already the name of sensors[0]"),
    ({"sensors": [{"name": "t", "kind": "bme280", "field": "temperature"},
                  {"name": "p", "kind": "pulse", "pin": 22}]},
     False, "sensors[1].pin: GPIO22 is the I2C bus's scl"),
    ({"sensors": [{"name": "w", "kind": "pulse", "pin": 36}]}, False,
     "sensors[0].pull: GPIO36 has no pull resistor"),
    ({"sensors": [{"name": "n" * 60, "unit": "u" * 60, "kind": "bme280",
                   "field": "temperature"} for _ in range(11)]},
     False, "sensors[1].name: 'nnn"),
    ({"sensors": [{"name": f"n{i:02d}" + "x" * 58, "unit": "u" * 60, "kind": "bme280",
                   "field": "humidity"} for i in range(11)]},
     False, "sensors: names, units and failure counts take 1441 bytes, more than a HELLO "
            "frame holds (1289)"),
])
def test_config_is_checked_whole_and_refused_naming_the_field(board, settings, unsupported,
                                                              message):
    repl = boot_node(board)
    repl.exec(
        "from node import config\n"
        f"cfg = dict(config.DEFAULTS)\ncfg.update({BASE!r})\nconfig.validate(cfg)\n"
        "def refusal(settings):\n"
        "    try:\n"
        "        config.apply_remote(cfg, settings)\n"
        "    except config.ConfigError as e:\n"
        "        return e.unsupported, str(e)\n"
    )
    got = repl.eval(f"refusal({settings!r})")
    assert got is not None, "accepted"
    assert got[0] is unsupported
    assert got[1].startswith(message), got[1]
