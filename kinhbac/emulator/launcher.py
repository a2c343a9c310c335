"""Starting emulated sensor nodes: boards with the real firmware, an identity and a sensor kit.

Until the fleet service issues identities, the launcher does: each node gets an 8-byte device
id ("kb" and its MAC), key id 1 and a random 32-byte secret, and `write_key_file` writes what a
receiver (the test receiver, the gateway) needs to verify them.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kinhbac import wire
from kinhbac.emulator.board import Board
from kinhbac.emulator.devices import BME280, AnalogSource, PulseSource
from kinhbac.emulator.site import Emulator
from kinhbac.firmware import config_file, firmware_files

LEVEL_PIN = 34  # an ADC1 pin, usable while WiFi is on
PULSE_PIN = 27

# A water-and-weather kit: a BME280, a level probe (0-3.3 V for 0-5 m), a water meter (0.5 L
# per pulse). Its order is the sensor table, so a reading's sensor index is its position here.
SENSOR_KIT = [
    {"name": "temperature", "unit": "C", "kind": "bme280", "field": "temperature"},
    {"name": "humidity", "unit": "%RH", "kind": "bme280", "field": "humidity"},
    {"name": "pressure", "unit": "Pa", "kind": "bme280", "field": "pressure"},
    {"name": "level", "unit": "m", "kind": "adc", "pin": LEVEL_PIN, "scale": 5.0 / 3.3},
    {"name": "water", "unit": "L", "kind": "pulse", "pin": PULSE_PIN, "per_pulse": 0.5},
]


@dataclass
class Node:
    """An emulated board provisioned as a sensor node, with handles on its sensor models."""

    board: Board
    key: wire.Key
    secret: bytes
    bme280: BME280
    level: AnalogSource
    meter: PulseSource

    @property
    def device(self) -> str:
        return wire.device_hex(self.key.device_id)


def node_config(node: "Node", gateway_port: int, emu: Emulator, **overrides: object) -> dict:
    config = {
        "device_id": node.device,
        "key_id": node.key.key_id,
        "secret": node.secret.hex(),
        "wifi": {"ssid": emu.access_point.ssid, "password": emu.access_point.password},
        "gateway": {"host": "127.0.0.1", "port": gateway_port},
        "sensors": SENSOR_KIT,
    }
    config.update(overrides)
    return config


def wired_node(board: Board, key: wire.Key, secret: bytes) -> Node:
    """`board` with the sensor kit's models attached to its pins, as the node `key` names."""
    node = Node(board, key, secret, BME280(0x76), AnalogSource(volts=1.0), PulseSource(PULSE_PIN))
    board.attach_i2c(node.bme280)
    board.attach_analog(LEVEL_PIN, node.level)
    board.attach_pulses(PULSE_PIN, node.meter)
    return node


def provision(emu: Emulator, gateway_port: int, name: str | None = None,
              **overrides: object) -> Node:
    """A new board with the firmware, its config and the sensor kit wired; powered off."""
    board = emu.add_board(name)
    secret = os.urandom(32)
    node = wired_node(board, wire.Key(b"kb" + board.mac, 1, secret), secret)
    config = node_config(node, gateway_port, emu, **overrides)
    board.write_files(firmware_files() | config_file(config))
    return node


def launch(emu: Emulator, count: int, gateway_port: int, **overrides: object) -> list[Node]:
    """`count` provisioned nodes, powered on."""
    nodes = [provision(emu, gateway_port, **overrides) for _ in range(count)]
    for node in nodes:
        node.board.power_on()
    return nodes


def write_key_file(path: Path, nodes: list[Node]) -> None:
    """The device keys a receiver needs, as JSON: [{device_id, key_id, secret}] in hex."""
    rows = [
        {"device_id": n.device, "key_id": n.key.key_id, "secret": n.secret.hex()}
        for n in nodes
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": rows}, indent=1))
    os.chmod(tmp, 0o600)  # secrets
    tmp.replace(path)


def read_key_file(path: Path) -> dict[bytes, wire.Key]:
    rows = json.loads(Path(path).read_text())["devices"]
    keys = {}
    for row in rows:
        device_id = bytes.fromhex(row["device_id"])
        keys[device_id] = wire.Key(device_id, row["key_id"], bytes.fromhex(row["secret"]))
    return keys
