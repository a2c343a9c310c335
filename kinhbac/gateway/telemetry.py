"""Telemetry JSON (kinhbac/mqtt_contract.py), built at publish time from the readings as the
queue keeps them: the wire's 7 bytes a reading and the sensor table of the node's HELLO."""

import json
import struct

from kinhbac import wire
from kinhbac.gateway.queue import Stored
from kinhbac.mqtt_contract import json_string, reading_json, unnamed_sensor

_READING = struct.Struct(">BHf")  # as on the wire: sensor index, offset ms, float32 value
_CACHED_TABLES = 4096  # sensor tables kept decoded; a site has a handful


def sensors_json(sensors: list[tuple[str, str]]) -> str:
    """A HELLO's sensor table as the queue keeps it (one row per distinct table)."""
    return json.dumps([list(s) for s in sensors], separators=(",", ":"))


class ReadingsEncoder:
    """Turns stored frames into the `readings` array's JSON objects."""

    def __init__(self) -> None:
        self._tables: dict[int, list[tuple[str, str]]] = {}

    def _names(self, frame: Stored) -> list[tuple[str, str]]:
        names = self._tables.get(frame.sensors_ref)
        if names is None:
            if len(self._tables) >= _CACHED_TABLES:
                self._tables.clear()
            # Each name and unit as a JSON string, encoded once per table, not per reading.
            names = [(json_string(n), json_string(u)) for n, u in json.loads(frame.sensors)]
            self._tables[frame.sensors_ref] = names
        return names

    def encode(self, frame: Stored) -> str:
        """The frame's readings as comma-separated JSON objects."""
        names = self._names(frame)
        known = len(names)
        unsynced = bool(frame.flags & wire.READINGS_UNSYNCED)
        pre_sync = bool(frame.flags & wire.READINGS_PRE_SYNC)
        base, seq = frame.base_ms, frame.first_seq
        out = []
        for index, offset, value in _READING.iter_unpack(frame.readings):
            sensor = names[index] if index < known else unnamed_sensor(index)
            out.append(reading_json(seq, sensor, value, base + offset, unsynced, pre_sync))
            seq += 1
        return ",".join(out)
