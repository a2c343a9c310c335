"""The device page's "Edit settings" form: the node's CONFIG settings as one labelled field each
(its unit, the node's default and the range the node accepts shown beside it) and the sensor
table as JSON, read back into the NodeConfigUpdate that PUT /api/devices/{id}/config takes.

The fleet's model decides what is accepted (models.NodeConfigUpdate); this module only turns
the form's text into the model's input and says which field the model refused. The defaults and
ranges shown are the node's own (firmware/node/config.py), read from its source, so the form
cannot drift from what the node will take.
"""

import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from kinhbac.firmware import FIRMWARE_DIR
from kinhbac.fleet.models import NODE_SETTINGS, NodeConfigUpdate

SENSORS = "sensors"
# A number longer than this is a paste gone wrong: the node's largest is 86,400,000 (8 digits).
# With SENSORS_MAX, the one refusal of the form's own (the API has no such limit): text this
# long is not shown back whole, nor sent on.
NUMBER_MAX = 20
# The sensor table, indented as the form shows it: a full table (1,300 bytes as compact JSON)
# takes about three times that.
SENSORS_MAX = 8000
_WHOLE = re.compile(r"^[+-]?[0-9]+$")
# The unit a setting's name ends in; the others count readings, or are a level.
_UNITS = (("_ms", "ms"), ("_s", "s"))
_COUNTS = frozenset({"batch_max", "flash_every"})


def _node_config() -> ModuleType:
    """firmware/node/config.py, loaded from its file: it imports only json and os, so CPython
    runs it as the node does (its sensor rules, loaded lazily there, are not needed here)."""
    spec = importlib.util.spec_from_file_location("kinhbac_node_config",
                                                  FIRMWARE_DIR / "node" / "config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_NODE = _node_config()
# The node's ranges are a private table of its module (micropython-lib habit: one tuple, no
# class); they are the rules its CONFIG check applies.
_NODE_RANGES = {name: (low, high) for name, low, high in _NODE._POSITIVE}


@dataclass(frozen=True)
class NumberSetting:
    """One whole-number setting as the form shows it."""

    name: str
    unit: str  # "ms", "s", "readings" or "" (log_level)
    default: int  # the node's, used while the setting is unset
    low: int  # the range the node accepts
    high: int


NUMBER_SETTINGS = tuple(
    NumberSetting(
        name=name,
        unit=next((unit for suffix, unit in _UNITS if name.endswith(suffix)),
                  "readings" if name in _COUNTS else ""),
        default=_NODE.DEFAULTS[name], low=_NODE_RANGES[name][0], high=_NODE_RANGES[name][1])
    for name in NODE_SETTINGS if name != SENSORS
)
FIELDS = (*(s.name for s in NUMBER_SETTINGS), SENSORS)


@dataclass
class ConfigForm:
    """The form's text per field (so a refusal shows it back), the problems found as
    (field, code, detail) with codes the template words, and what to store once there are
    none. Field "" is the settings as a whole."""

    values: dict[str, str] = field(default_factory=lambda: dict.fromkeys(FIELDS, ""))
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    update: NodeConfigUpdate | None = None

    def error(self, name: str) -> tuple[str, str] | None:
        """The problem of field `name` (code, detail), if any."""
        return next(((code, detail) for where, code, detail in self.errors if where == name),
                    None)


def current(node_config: Mapping[str, Any] | None) -> ConfigForm:
    """The form filled with the device's stored settings; an unset one is an empty field."""
    form = ConfigForm()
    for name, value in (node_config or {}).items():
        if name == SENSORS:
            form.values[name] = json.dumps(value, indent=2, ensure_ascii=False)
        elif name in form.values:
            form.values[name] = str(value)
    return form


def _reason(exc: ValidationError) -> str:
    """The model's words, with where inside the field (a sensor entry's key) when it says."""
    return "; ".join(
        ": ".join([*(str(part) for part in error["loc"][1:]),
                   error["msg"].removeprefix("Value error, ")])
        for error in exc.errors())


def parse_form(given: Mapping[str, Any]) -> ConfigForm:
    """The form as a NodeConfigUpdate, each field checked by the API's own model, so every
    field's problem is named at once; a field left empty is a setting unset."""
    form = ConfigForm()
    settings: dict[str, Any] = {}
    for name in FIELDS:
        text = given.get(name)
        text = text.strip() if isinstance(text, str) else ""
        limit = SENSORS_MAX if name == SENSORS else NUMBER_MAX
        form.values[name] = text[:limit]
        if not text:
            continue
        if len(text) > limit:
            form.errors.append((name, "too_long", str(limit)))
            continue
        value: Any = text
        if name == SENSORS:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:  # nested deeper than the parser goes
                line, column = getattr(exc, "lineno", 1), getattr(exc, "colno", 1)
                form.errors.append((name, "json", f"{line}:{column}"))
                continue
        elif _WHOLE.match(text):
            value = int(text)
        # Anything else goes to the model as typed: it is the model that refuses it.
        try:
            NodeConfigUpdate(settings={name: value})
        except ValidationError as exc:
            form.errors.append((name, "sensors" if name == SENSORS else "whole", _reason(exc)))
            continue
        settings[name] = value
    if form.errors:
        return form
    try:
        # Together: what no field breaks alone (a CONFIG frame's size).
        form.update = NodeConfigUpdate(settings=settings)
    except ValidationError as exc:
        form.errors.append(("", "whole_form", _reason(exc)))
    return form
