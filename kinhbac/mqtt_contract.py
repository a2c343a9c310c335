"""The gateway -> broker -> fleet hop: topics and payloads, as `wire.py` is the node -> gateway hop.

Both sides build and parse what they exchange here (the gateway turning what the wire carries,
e.g. a HELLO's counters, into JSON), and docs/mqtt.md describes it (a test checks
the page's topic table and example payloads against this module). Kept free of aiomqtt and of
the database so that the gateway, the fleet's ingest, the demo and tests import it cheaply.

Topics are `<prefix>/<site>/...`; the payloads are UTF-8 JSON objects: telemetry compact, the
statuses with `json.dumps`'s default separators. A parser's models ignore fields a later gateway
adds.
"""

import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kinhbac import wire

DEFAULT_PREFIX = "kinhbac"
INT64 = 2**63 - 1  # the fleet database's BIGINT
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last instant a datetime holds
MAX_READINGS_PER_MESSAGE = 10_000  # the gateway sends at most mqtt.readings_per_message (200)
MAX_SITE_LENGTH = 63  # a site is a DNS label's length at most (the fleet's sites table)
# Readings a gateway's status may say it holds: a trillion is 7 TB of readings at the wire's 7
# bytes each, far past any disk a gateway has (its cap's default is 16 GiB at most).
MAX_QUEUE_DEPTH = 10**12

# The last level of each topic, and the level that tells a gateway's topics from a device's.
TELEMETRY = "telemetry"
STATUS = "status"
PROBE = "probe"
OTA = "ota"
GATEWAY = "gateway"
ANY = "+"  # MQTT's single-level wildcard

_FLOAT32 = struct.Struct(">f")
_FLOAT32_DIGITS = 9  # significant digits that always round-trip a float32 (FLT_DECIMAL_DIG)


# ---- topics


def telemetry_topic(prefix: str, site: str, device: str) -> str:
    """Where a device's readings go: `<prefix>/<site>/<device>/telemetry`."""
    return f"{prefix}/{site}/{device}/{TELEMETRY}"


def device_status_topic(prefix: str, site: str, device: str) -> str:
    """A device's retained status (its last HELLO): `<prefix>/<site>/<device>/status`."""
    return f"{prefix}/{site}/{device}/{STATUS}"


def gateway_status_topic(prefix: str, site: str, gateway: str) -> str:
    """A gateway's retained status and last will: `<prefix>/<site>/gateway/<gateway>/status`."""
    return f"{prefix}/{site}/{GATEWAY}/{gateway}/{STATUS}"


def gateway_probe_topic(prefix: str, site: str, gateway: str) -> str:
    """A gateway's write check on each connect; consumers ignore it."""
    return f"{prefix}/{site}/{GATEWAY}/{gateway}/{PROBE}"


def ota_progress_topic(prefix: str, site: str, device: str) -> str:
    """Where a device's update progress goes (not retained, QoS 1, through the gateway's
    on-disk queue like readings): `<prefix>/<site>/<device>/ota`."""
    return f"{prefix}/{site}/{device}/{OTA}"


def ota_progress_filter(prefix: str, site: str = ANY) -> str:
    """Every device's update progress (of one site, or of all)."""
    return ota_progress_topic(prefix, site, ANY)


def telemetry_filter(prefix: str, site: str = ANY) -> str:
    """Every device's telemetry (of one site, or of all)."""
    return telemetry_topic(prefix, site, ANY)


def device_status_filter(prefix: str, site: str = ANY) -> str:
    """Every device's status (of one site, or of all)."""
    return device_status_topic(prefix, site, ANY)


def gateway_status_filter(prefix: str, site: str = ANY) -> str:
    """Every gateway's status (of one site, or of all)."""
    return gateway_status_topic(prefix, site, ANY)


@dataclass(frozen=True)
class Topic:
    """A parsed topic: what it carries, its site, and the device or the gateway it names."""

    kind: Literal["telemetry", "device_status", "gateway_status", "ota_progress"]
    site: str
    device: str | None = None
    gateway: str | None = None


class TopicError(ValueError):
    """A topic that is not one a consumer reads: the reason is the message."""


def parse_topic(prefix: str, topic: str) -> Topic:
    """The kind, site and device or gateway of a topic a consumer reads; TopicError otherwise.

    The device id is not checked here: the payload's own `device` must equal it."""
    head = prefix + "/"
    if not topic.startswith(head):
        raise TopicError("not under the topic prefix")
    parts = topic[len(head):].split("/")
    if len(parts[0]) > MAX_SITE_LENGTH:
        raise TopicError(f"site longer than {MAX_SITE_LENGTH} characters")
    match parts:
        case [site, device, "telemetry"] if site:
            return Topic("telemetry", site, device=device)
        case [site, device, "status"] if site:
            return Topic("device_status", site, device=device)
        case [site, device, "ota"] if site:
            return Topic("ota_progress", site, device=device)
        case [site, "gateway", gateway, "status"] if site:
            return Topic("gateway_status", site, gateway=gateway)
    raise TopicError("not a topic the ingest reads")


# ---- values


def format_value(value: float) -> str:
    """A float32 reading as a JSON number people read: the shortest decimal that gives back the
    same float32 (21.3, not 21.299999237060547); `null` for NaN and infinities, which JSON lacks.

    Written as Python's repr of that decimal (`100812.0`, `1e-05`), as json.dumps would."""
    if not math.isfinite(value):
        return "null"
    bits = _FLOAT32.pack(value)

    def round_trips(digits: int) -> bool:
        try:
            return _FLOAT32.pack(float(f"{value:.{digits}g}")) == bits
        except OverflowError:  # rounded past the largest float32
            return False

    # If some number of digits round-trips, more do too (the nearest decimal with more digits is
    # no farther), so a binary search finds the fewest: 3 or 4 tries instead of up to 9.
    low, high = 1, _FLOAT32_DIGITS
    while low < high:
        middle = (low + high) // 2
        if round_trips(middle):
            high = middle
        else:
            low = middle + 1
    return repr(float(f"{value:.{low}g}"))


# ---- payloads, as the consumer validates them


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _text(max_length: int, min_length: int = 0) -> Any:
    # No NUL: PostgreSQL's text refuses it, and a batch it fails must not be retried forever.
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length,
                                            pattern=r"^[^\x00]*$")]


DeviceId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
Name = _text(63, min_length=1)
Counters = Annotated[
    dict[_text(32), Annotated[int, Field(ge=0, le=INT64)]],
    Field(max_length=64),
]
Millis = Annotated[int, Field(ge=0, le=MAX_TS_MS)]


class TelemetryReading(_Payload):
    seq: int = Field(ge=0, le=INT64)
    sensor: _text(64)
    unit: _text(16)
    value: Annotated[float, Field(allow_inf_nan=False)] | None
    ts: Millis | None = None
    boot_ms: int | None = Field(default=None, ge=0, le=INT64)
    pre_sync: bool = False


class Telemetry(_Payload):
    """A batch of readings of one device and one boot, `seq` ascending."""

    device: DeviceId
    boot: int = Field(ge=0, le=INT64)
    readings: list[TelemetryReading] = Field(max_length=MAX_READINGS_PER_MESSAGE)
    # Always sent by the gateway; the ingest takes the site from the topic and needs none of them.
    site: _text(MAX_SITE_LENGTH) | None = None
    gateway: Name | None = None
    seq: int | None = Field(default=None, ge=0, le=INT64)
    replayed: bool = False


class SensorEntry(_Payload):
    name: _text(64)
    unit: _text(16)


class SensorFailures(_Payload):
    sensor_error: int = Field(ge=0, le=INT64)
    out_of_range: int = Field(ge=0, le=INT64)


class DeviceStatusMessage(_Payload):
    """A node's last HELLO, as its gateway publishes it (retained)."""

    device: DeviceId
    gateway: Name
    last_seen_ms: Millis
    site: _text(MAX_SITE_LENGTH) | None = None
    firmware: _text(64) | None = None
    boot: int | None = Field(default=None, ge=0, le=INT64)
    reset_cause: _text(32) | None = None
    drops: Counters = Field(default_factory=dict)
    sensors: list[SensorEntry] = Field(default_factory=list, max_length=256)
    # By sensor name; absent from a node that does not count its failures per sensor.
    sensor_failures: dict[_text(64), SensorFailures] | None = Field(default=None, max_length=256)
    # Flash bytes an update may use (HELLO's u32); null from a node that did not say.
    free_flash_bytes: int | None = Field(default=None, ge=0, le=wire.MAX_U32, strict=True)
    safe_mode: str | None = None  # only while the node is in safe mode: the reason it gave


class GatewayStatusMessage(_Payload):
    state: Literal["online", "offline"]
    gateway: Name
    since_ms: Millis | None = None  # absent from the last will
    dropped: Counters | None = None
    # Readings in the gateway's on-disk queue not yet acknowledged by the broker, and when the
    # oldest of them was queued (null while none is). Both absent from the last will and from a
    # gateway before them: "not reported", not an empty queue.
    queue_depth: int | None = Field(default=None, ge=0, le=MAX_QUEUE_DEPTH, strict=True)
    oldest_queued_ms: int | None = Field(default=None, ge=0, le=MAX_TS_MS, strict=True)

    @model_validator(mode="after")
    def _queue_figures_agree(self) -> "GatewayStatusMessage":
        # A consumer shows an age from oldest_queued_ms: one that contradicts the depth (a
        # forged or broken status) must not reach it.
        if self.oldest_queued_ms is not None and not self.queue_depth:
            raise ValueError("oldest_queued_ms given without queued readings (queue_depth "
                             f"{self.queue_depth})")
        if self.queue_depth and self.oldest_queued_ms is None:
            raise ValueError(f"queue_depth {self.queue_depth} without oldest_queued_ms")
        return self


# A device's update steps as the fleet's rollouts record them (docs/ota.md): `offered` is the
# gateway's (it sent the offer), the rest are the node's OTA_RESULT states by their wire names.
# `failed` also carries a gateway's refusal of a release (signature, hash) for that device.
OTA_STATES = ("offered",) + tuple(wire.OTA_STATE_NAMES[s] for s in sorted(wire.OTA_STATE_NAMES))
OtaState = Literal["offered", "downloading", "verifying", "installed", "rebooting", "confirmed",
                   "failed", "rolled_back"]
MAX_OTA_REASON = 255  # a str8 on the wire


class OtaProgressMessage(_Payload):
    """One step of one device's update, as its gateway heard it."""

    device: DeviceId
    gateway: Name
    release_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f-]{36}$")]
    rollout_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f-]{36}$")] | None = None
    version: _text(64)
    state: OtaState
    bytes: int = Field(default=0, ge=0, le=2**32 - 1)  # bytes written so far (wire u32)
    reason: _text(MAX_OTA_REASON) = ""
    ts_ms: Millis  # the gateway's clock when it heard the step
    boot: int | None = Field(default=None, ge=0, le=INT64)  # the node's boot that reported it
    site: _text(MAX_SITE_LENGTH) | None = None


def parse_telemetry(payload: str | bytes) -> Telemetry:
    """A telemetry payload; pydantic's ValidationError when it is not the documented shape."""
    return Telemetry.model_validate_json(payload)


def parse_device_status(payload: str | bytes) -> DeviceStatusMessage:
    """A device status payload; pydantic's ValidationError when it is not the documented shape."""
    return DeviceStatusMessage.model_validate_json(payload)


def parse_gateway_status(payload: str | bytes) -> GatewayStatusMessage:
    """A gateway status payload; pydantic's ValidationError when it is not the documented shape."""
    return GatewayStatusMessage.model_validate_json(payload)


def parse_ota_progress(payload: str | bytes) -> OtaProgressMessage:
    """An update progress payload; pydantic's ValidationError when it is not the documented
    shape."""
    return OtaProgressMessage.model_validate_json(payload)


# ---- payloads, as the gateway builds them
#
# Telemetry is built as text, reading by reading, from the queue's stored frames: at a site's
# thousands of readings a second, building dicts for json.dumps would cost more than the rest.


def json_string(text: str) -> str:
    """A string as JSON (for reading_json's names, which callers encode once per sensor table)."""
    return json.dumps(text)


def reading_json(seq: int, names: tuple[str, str], value: float, time_ms: int,
                 unsynced: bool, pre_sync: bool) -> str:
    """One reading's JSON object. `names` are the sensor's name and unit, already JSON strings;
    `time_ms` is Unix ms, or ms since boot when `unsynced` (the node's clock never synced)."""
    name, unit = names
    number = format_value(value)
    if unsynced:  # only ms since its boot are known
        return (f'{{"seq":{seq},"sensor":{name},"value":{number},"unit":{unit},"ts":null,'
                f'"boot_ms":{time_ms},"pre_sync":true}}')
    return (f'{{"seq":{seq},"sensor":{name},"value":{number},"unit":{unit},"ts":{time_ms},'
            f'"pre_sync":{"true" if pre_sync else "false"}}}')


def unnamed_sensor(index: int) -> tuple[str, str]:
    """Name and unit (JSON strings) of a sensor index the node's HELLO did not name."""
    return f'"sensor{index}"', '""'


def telemetry_payload(*, device: str, site: str, gateway: str, boot: int, seq: int,
                      replayed: bool, readings: str) -> bytes:
    """A telemetry message; `readings` is reading_json's objects joined by commas."""
    head = json.dumps({
        "device": device,
        "site": site,
        "gateway": gateway,
        "boot": boot,
        "seq": seq,
        "replayed": replayed,
    }, separators=(",", ":"))
    return f'{head[:-1]},"readings":[{readings}]}}'.encode()


def drop_counters(drops: list[int]) -> dict[str, int]:
    """A node's HELLO counters by their wire names; one past those (a later firmware's) by its
    position, as counter_<n>."""
    names = wire.DROP_NAMES
    return {names[i] if i < len(names) else f"counter_{i}": n for i, n in enumerate(drops)}


# A sensor's two failure counts in the device status, named as the HELLO counters they split
# by sensor: scheduled readings not taken, and readings out of range.
FAILURE_NAMES = (wire.DROP_NAMES[wire.DROP_SENSOR_ERROR], wire.DROP_NAMES[wire.DROP_OUT_OF_RANGE])


def sensor_failure_counts(sensors: list[tuple[str, str]],
                          failures: list[list[int]]) -> dict[str, dict[str, int]]:
    """Each sensor's failure counts (HELLO, in table order) by the sensor's name."""
    return {name: dict(zip(FAILURE_NAMES, counts, strict=True))
            for (name, _), counts in zip(sensors, failures, strict=True)}


def device_status(*, device: str, site: str, gateway: str, last_seen_ms: int, firmware: str,
                  boot: int, reset_cause: str, drops: list[int], sensors: list[tuple[str, str]],
                  failures: list[list[int]] | None = None,
                  free_flash_bytes: int | None = None) -> dict[str, Any]:
    """A device status from a node's HELLO (its counters, per-sensor failure counts and free
    flash as the wire has them), as a dict the gateway keeps and updates (`last_seen_ms`,
    `safe_mode`) between publishes; device_status_payload() writes it."""
    status: dict[str, Any] = {
        "device": device,
        "site": site,
        "gateway": gateway,
        "last_seen_ms": last_seen_ms,
        "firmware": firmware,
        "boot": boot,
        "reset_cause": reset_cause,
        "drops": drop_counters(drops),
        "sensors": [{"name": n, "unit": u} for n, u in sensors],
        # Always there, null when the node did not say: a consumer tells "not reported" from
        # a field it has never heard of.
        "free_flash_bytes": free_flash_bytes,
    }
    if failures is not None:  # a node that counts its failures per sensor
        status["sensor_failures"] = sensor_failure_counts(sensors, failures)
    return status


def device_status_payload(status: dict[str, Any]) -> bytes:
    """A device status (device_status()'s dict, perhaps updated) as published."""
    return json.dumps(status).encode()


def gateway_status_payload(*, state: Literal["online", "offline"], gateway: str,
                           since_ms: int | None = None,
                           dropped: dict[str, int] | None = None,
                           queue_depth: int | None = None,
                           oldest_queued_ms: int | None = None) -> bytes:
    """A gateway status; without `since_ms` and `dropped`, the last will. With `queue_depth`,
    its queue too: `oldest_queued_ms` is then written (null while the queue is empty)."""
    doc: dict[str, Any] = {"state": state, "gateway": gateway}
    if since_ms is not None or dropped is not None:
        doc["since_ms"] = since_ms
        doc["dropped"] = dropped if dropped is not None else {}
        if queue_depth is not None:
            doc["queue_depth"] = queue_depth
            # An empty queue has no oldest reading, whatever a stale figure says.
            doc["oldest_queued_ms"] = oldest_queued_ms if queue_depth else None
    return json.dumps(doc).encode()


def ota_progress_payload(*, device: str, site: str, gateway: str, release_id: str,
                         rollout_id: str | None, version: str, state: str, ts_ms: int,
                         bytes_so_far: int = 0, reason: str = "",
                         boot: int | None = None) -> bytes:
    """One step of a device's update (OtaProgressMessage's shape)."""
    if state not in OTA_STATES:
        raise ValueError(f"unknown update state {state!r}")
    return json.dumps({
        "device": device, "site": site, "gateway": gateway, "release_id": release_id,
        "rollout_id": rollout_id, "version": version, "state": state, "bytes": bytes_so_far,
        "reason": reason[:MAX_OTA_REASON], "ts_ms": ts_ms, "boot": boot,
    }).encode()


def probe_payload(nonce: str) -> bytes:
    """The gateway's write check: JSON, like every topic."""
    return json.dumps({"probe": nonce}).encode()
