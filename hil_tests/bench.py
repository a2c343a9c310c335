"""What a lab bench offers the suite, read from its bench file (see bench.example.toml and
docs/hil.md): the WiFi the boards join, the host's address on it, and for each board the
controls wired to it. A control the file does not name is one the bench lacks: the tests that
need it are skipped, saying which control and where docs/hil.md explains how to wire it."""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BenchFileError(ValueError):
    """The bench file cannot be used; the message names the key and what to write."""


@dataclass(frozen=True)
class Wiring:
    """One board's connections on the bench. None: not wired."""

    port: str
    power: str | None = None  # a command cutting this board's USB power: {state} is on/off
    # A command shutting this board alone out of the access point: {state} is out/in.
    wifi_range: str | None = None
    source_port: str | None = None  # a second MicroPython board driving this one's inputs
    dac_pin: int | None = None  # the source board's DAC pin, wired to the level pin
    pulse_pin: int | None = None  # the source board's PWM pin, wired to the pulse pin
    bme280: bool = False  # a BME280 on the node's I2C bus (SDA 21, SCL 22)
    room_temperature_c: float | None = None  # the bench's reference thermometer, if any


@dataclass(frozen=True)
class Bench:
    """The bench as a whole; `boards` by serial port."""

    wifi_ssid: str | None = None
    wifi_password: str | None = None
    gateway_host: str | None = None  # the host's address on the bench WiFi
    access_point_down: str | None = None  # shell commands taking the bench AP down and up
    access_point_up: str | None = None
    boards: dict[str, Wiring] = field(default_factory=dict)

    def wiring(self, port: str) -> Wiring:
        return self.boards.get(port) or Wiring(port)

    @property
    def runs_nodes(self) -> bool:
        """Whether a board can run the node firmware here: it must join a WiFi and reach the
        host's gateway."""
        return bool(self.wifi_ssid and self.gateway_host)


_BOARD_KEYS = {"port": str, "power": str, "wifi_range": str, "source_port": str,
               "dac_pin": int, "pulse_pin": int, "bme280": bool,
               "room_temperature_c": (int, float)}


def _typed(where: str, values: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BenchFileError(f"{where}: unknown key {unknown[0]!r}; known: "
                             f"{', '.join(sorted(known))}")
    for key, value in values.items():
        if not isinstance(value, known[key]) or (known[key] is int and isinstance(value, bool)):
            raise BenchFileError(f"{where}: {key} = {value!r} is not "
                                 f"{getattr(known[key], '__name__', 'a number')}")
    return values


def load(path: Path) -> Bench:
    """The bench described by the TOML file at `path`."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise BenchFileError(f"cannot read the bench file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BenchFileError(f"{path} is not valid TOML: {exc}") from exc
    top = {"wifi": dict, "gateway_host": str, "access_point": dict, "boards": list}
    _typed(str(path), data, top)
    wifi = _typed(f"{path} [wifi]", data.get("wifi", {}), {"ssid": str, "password": str})
    ap = _typed(f"{path} [access_point]", data.get("access_point", {}),
                {"down": str, "up": str})
    if bool(ap.get("down")) != bool(ap.get("up")):
        raise BenchFileError(f"{path} [access_point]: give both down and up, or neither")
    boards: dict[str, Wiring] = {}
    for index, row in enumerate(data.get("boards", [])):
        where = f"{path} [[boards]] #{index + 1}"
        if not isinstance(row, dict) or "port" not in row:
            raise BenchFileError(f"{where}: each board needs its port, e.g. "
                                 "port = \"/dev/ttyUSB0\"")
        values = _typed(where, row, _BOARD_KEYS)
        if "power" in values and "{state}" not in values["power"]:
            raise BenchFileError(f"{where}: power must contain {{state}} (on or off), e.g. "
                                 "\"uhubctl -l 1-1 -p 2 -a {state}\"")
        if "wifi_range" in values and "{state}" not in values["wifi_range"]:
            raise BenchFileError(f"{where}: wifi_range must contain {{state}} (out or in), e.g. "
                                 "\"ssh root@192.168.50.2 /root/kb-range {state} "
                                 "24:0a:c4:12:34:56\"")
        if ("dac_pin" in values or "pulse_pin" in values) and "source_port" not in values:
            raise BenchFileError(f"{where}: dac_pin and pulse_pin are pins of the source board: "
                                 "give its source_port too")
        if values["port"] in boards:
            raise BenchFileError(f"{where}: port {values['port']} is listed twice")
        boards[values["port"]] = Wiring(**values)
    return Bench(wifi_ssid=wifi.get("ssid"), wifi_password=wifi.get("password"),
                 gateway_host=data.get("gateway_host"), access_point_down=ap.get("down"),
                 access_point_up=ap.get("up"), boards=boards)
