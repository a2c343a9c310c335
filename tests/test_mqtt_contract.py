"""The gateway -> broker -> fleet contract (kinhbac/mqtt_contract.py): value formatting, topics,
payloads, and docs/mqtt.md checked against them."""

import json
import math
import random
import re
import struct
from pathlib import Path

import pytest
from pydantic import ValidationError

from kinhbac import mqtt_contract as contract
from kinhbac import wire

MQTT_MD = Path(__file__).resolve().parents[1] / "docs" / "mqtt.md"
F32 = struct.Struct(">f")
U32 = struct.Struct(">I")


def f32(bits: int) -> float:
    return F32.unpack(U32.pack(bits))[0]


def significant_digits(text: str) -> int:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0").rstrip("0")
    return max(1, len(mantissa))


def bit_patterns() -> list[int]:
    """Edges (zeros, subnormals, the largest float32, powers of ten, inf, NaNs) and 200,000
    random bit patterns, every exponent about equally likely."""
    edges = [0, 0x8000_0000, 1, 0x8000_0001, 0x007F_FFFF, 0x0080_0000, 0x7F7F_FFFF, 0xFF7F_FFFF,
             0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0xFFC0_0001, 0x7F80_0001]
    edges += [U32.unpack(F32.pack(10.0 ** e))[0] for e in range(-38, 39)]
    edges += [U32.unpack(F32.pack(v))[0] for v in (21.3, 0.1, 100812.0, 1 / 3, 16_777_217.0)]
    rng = random.Random(20261206)
    return edges + [rng.getrandbits(32) for _ in range(200_000)]


def test_a_reading_goes_out_as_the_shortest_decimal_that_gives_back_its_float32():
    for bits in bit_patterns():
        value = f32(bits)
        text = contract.format_value(value)
        if not math.isfinite(value):
            assert text == "null", (hex(bits), text)  # JSON has no NaN or infinity
            continue
        back = json.loads(text)
        assert isinstance(back, float), (hex(bits), text)  # written as a float, like repr()
        assert F32.pack(back) == U32.pack(bits), (hex(bits), text)  # exact round trip
        digits = significant_digits(text)
        if digits > 1:  # no decimal with one digit fewer round-trips (the nearest one does not)
            shorter = float(f"{value:.{digits - 1}g}")
            try:
                assert F32.pack(shorter) != U32.pack(bits), (hex(bits), text)
            except OverflowError:
                pass


@pytest.mark.parametrize(("value", "text"), [
    (21.3, "21.3"), (21.5, "21.5"), (100812.0, "100812.0"), (0.1, "0.1"), (-0.0, "-0.0"),
    (1e-05, "1e-05"), (3.4028234663852886e38, "3.4028235e+38"), (1 / 3, "0.33333334"),
    (math.inf, "null"), (-math.inf, "null"), (math.nan, "null"),
])
def test_values_read_as_people_wrote_them(value, text):
    assert contract.format_value(F32.unpack(F32.pack(value))[0]) == text


def test_a_reading_and_a_telemetry_message_are_these_bytes():
    names = (contract.json_string("temperature"), contract.json_string("C"))
    value = F32.unpack(F32.pack(21.3))[0]
    readings = ",".join([
        contract.reading_json(1, names, value, 1795917410085, False, False),
        contract.reading_json(2, contract.unnamed_sensor(7), math.nan, 4210, True, True),
    ])
    payload = contract.telemetry_payload(device="6b62a1b2c3d4e5f6", site="site-a",
                                         gateway="pi-01", boot=7, seq=1, replayed=False,
                                         readings=readings)
    assert payload == (
        b'{"device":"6b62a1b2c3d4e5f6","site":"site-a","gateway":"pi-01","boot":7,"seq":1,'
        b'"replayed":false,"readings":['
        b'{"seq":1,"sensor":"temperature","value":21.3,"unit":"C","ts":1795917410085,'
        b'"pre_sync":false},'
        b'{"seq":2,"sensor":"sensor7","value":null,"unit":"","ts":null,"boot_ms":4210,'
        b'"pre_sync":true}]}')
    parsed = contract.parse_telemetry(payload)
    assert [(r.seq, r.sensor, r.value, r.ts, r.boot_ms) for r in parsed.readings] == [
        (1, "temperature", 21.3, 1795917410085, None), (2, "sensor7", None, None, 4210)]


def test_every_topic_parses_back_to_what_built_it():
    p, site, device, gw = "kinhbac", "site-a", "6b62a1b2c3d4e5f6", "pi-01"
    assert contract.parse_topic(p, contract.telemetry_topic(p, site, device)) == \
        contract.Topic("telemetry", site, device=device)
    assert contract.parse_topic(p, contract.device_status_topic(p, site, device)) == \
        contract.Topic("device_status", site, device=device)
    assert contract.parse_topic(p, contract.gateway_status_topic(p, site, gw)) == \
        contract.Topic("gateway_status", site, gateway=gw)


@pytest.mark.parametrize(("topic", "reason"), [
    ("other/site-a/6b62a1b2c3d4e5f6/telemetry", "not under the topic prefix"),
    ("kinhbac/" + "s" * 64 + "/6b62a1b2c3d4e5f6/telemetry", "site longer than 63 characters"),
    ("kinhbac/site-a/gateway/pi-01/probe", "not a topic the ingest reads"),
    ("kinhbac//6b62a1b2c3d4e5f6/telemetry", "not a topic the ingest reads"),
    ("kinhbac/site-a/6b62a1b2c3d4e5f6/telemetry/x", "not a topic the ingest reads"),
])
def test_a_topic_no_consumer_reads_is_refused_with_its_reason(topic, reason):
    with pytest.raises(contract.TopicError, match=reason):
        contract.parse_topic("kinhbac", topic)


def test_a_device_status_names_the_hello_counters_as_the_wire_does():
    status = contract.device_status(
        device="6b62a1b2c3d4e5f6", site="site-a", gateway="pi-01", last_seen_ms=1, firmware="0.1.0",
        boot=2, reset_cause="POWER_ON", drops=list(range(len(wire.DROP_NAMES) + 2)),
        sensors=[("temperature", "C"), ("level", "m")], failures=[[3, 4], [0, 5]])
    assert list(status["drops"]) == [*wire.DROP_NAMES, f"counter_{len(wire.DROP_NAMES)}",
                                     f"counter_{len(wire.DROP_NAMES) + 1}"]
    assert status["sensor_failures"] == {"temperature": {"sensor_error": 3, "out_of_range": 4},
                                         "level": {"sensor_error": 0, "out_of_range": 5}}
    parsed = contract.parse_device_status(contract.device_status_payload(status))
    assert parsed.sensor_failures is not None and parsed.drops == status["drops"]
    del status["sensor_failures"]  # firmware that does not count by sensor
    assert contract.parse_device_status(contract.device_status_payload(status)) \
        .sensor_failures is None


def test_a_device_status_carries_the_nodes_free_flash_or_null_when_it_did_not_say():
    hello = {"device": "6b62a1b2c3d4e5f6", "site": "site-a", "gateway": "pi-01",
             "last_seen_ms": 1, "firmware": "0.2.0", "boot": 2, "reset_cause": "SOFT",
             "drops": [0] * 7, "sensors": [("level", "m")], "failures": [[0, 0]]}
    status = contract.device_status(**hello, free_flash_bytes=2**32 - 1)
    payload = contract.device_status_payload(status)
    assert b'"free_flash_bytes": 4294967295' in payload
    assert contract.parse_device_status(payload).free_flash_bytes == 2**32 - 1
    older = contract.device_status_payload(contract.device_status(**hello))
    assert b'"free_flash_bytes": null' in older  # said, not left out: "the node did not say"
    assert contract.parse_device_status(older).free_flash_bytes is None
    # A status from a gateway before the field parses too, with None.
    del status["free_flash_bytes"]
    assert contract.parse_device_status(contract.device_status_payload(status)) \
        .free_flash_bytes is None


@pytest.mark.parametrize("figure", [-1, 2**32, "4096", 4096.5, True])
def test_a_device_status_with_a_free_flash_no_node_can_send_is_refused(figure):
    # The wire's u32 and nothing else: the fleet's rollout check must not meet a bad figure.
    status = contract.device_status(
        device="6b62a1b2c3d4e5f6", site="site-a", gateway="pi-01", last_seen_ms=1,
        firmware="0.2.0", boot=2, reset_cause="SOFT", drops=[], sensors=[],
        free_flash_bytes=figure)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        contract.parse_device_status(contract.device_status_payload(status))


def test_the_gateway_status_and_its_last_will_are_these_bytes():
    assert contract.gateway_status_payload(state="online", gateway="pi-01", since_ms=5,
                                           dropped={}) == \
        b'{"state": "online", "gateway": "pi-01", "since_ms": 5, "dropped": {}}'
    assert contract.gateway_status_payload(state="offline", gateway="pi-01") == \
        b'{"state": "offline", "gateway": "pi-01"}'
    with pytest.raises(ValidationError):
        contract.parse_gateway_status(b'{"state": "away", "gateway": "pi-01"}')



def test_the_gateway_status_carries_its_queue_depth_and_when_the_oldest_queued_reading_came():
    busy = contract.gateway_status_payload(state="online", gateway="pi-01", since_ms=5,
                                           dropped={}, queue_depth=1200,
                                           oldest_queued_ms=1795917262089)
    assert busy == (b'{"state": "online", "gateway": "pi-01", "since_ms": 5, "dropped": {}, '
                    b'"queue_depth": 1200, "oldest_queued_ms": 1795917262089}')
    parsed = contract.parse_gateway_status(busy)
    assert (parsed.queue_depth, parsed.oldest_queued_ms) == (1200, 1795917262089)
    # Empty: the oldest is said to be none (null), even when the caller's figure is stale.
    empty = contract.gateway_status_payload(state="online", gateway="pi-01", since_ms=5,
                                            dropped={}, queue_depth=0, oldest_queued_ms=7)
    assert empty.endswith(b'"queue_depth": 0, "oldest_queued_ms": null}')
    parsed = contract.parse_gateway_status(empty)
    assert (parsed.queue_depth, parsed.oldest_queued_ms) == (0, None)


def test_a_gateway_status_from_a_gateway_before_the_queue_figures_parses_as_not_reported():
    for old in (b'{"state": "online", "gateway": "pi-01", "since_ms": 5, "dropped": {}}',
                b'{"state": "offline", "gateway": "pi-01"}'):
        parsed = contract.parse_gateway_status(old)
        assert parsed.queue_depth is None and parsed.oldest_queued_ms is None


@pytest.mark.parametrize(("figures", "complaint"), [
    ({"queue_depth": -1, "oldest_queued_ms": 5}, "greater than or equal to 0"),
    ({"queue_depth": contract.MAX_QUEUE_DEPTH + 1, "oldest_queued_ms": 5}, "less than or equal"),
    ({"queue_depth": 2**63, "oldest_queued_ms": 5}, "less than or equal"),
    ({"queue_depth": "12", "oldest_queued_ms": 5}, "valid integer"),
    ({"queue_depth": 12.5, "oldest_queued_ms": 5}, "valid integer"),
    ({"queue_depth": True, "oldest_queued_ms": 5}, "valid integer"),
    ({"queue_depth": 3, "oldest_queued_ms": -1}, "greater than or equal to 0"),
    ({"queue_depth": 3, "oldest_queued_ms": contract.MAX_TS_MS + 1}, "less than or equal"),
    ({"queue_depth": 3, "oldest_queued_ms": "yesterday"}, "valid integer"),
    ({"queue_depth": 0, "oldest_queued_ms": 5}, "without queued readings"),
    ({"oldest_queued_ms": 5}, "without queued readings"),
    ({"queue_depth": 3, "oldest_queued_ms": None}, "without oldest_queued_ms"),
    ({"queue_depth": 3}, "without oldest_queued_ms"),
])
def test_a_gateway_status_with_queue_figures_no_gateway_sends_is_refused_saying_why(
        figures, complaint):
    # A forged status must not put a negative, absurd or contradictory backlog on the console.
    doc = {"state": "online", "gateway": "pi-01", "since_ms": 5, "dropped": {}} | figures
    with pytest.raises(ValidationError) as refused:
        contract.parse_gateway_status(json.dumps(doc))
    assert complaint in str(refused.value)


# ---- docs/mqtt.md, checked against the module


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _json_blocks(section: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", section, re.S)


def test_the_docs_topic_table_is_the_modules_topics():
    doc = MQTT_MD.read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", _section(doc, "Topics"), re.M)
    args = (contract.DEFAULT_PREFIX, "<site>")
    assert rows == [
        contract.telemetry_topic(*args, "<device>"),
        contract.device_status_topic(*args, "<device>"),
        contract.ota_progress_topic(*args, "<device>"),
        contract.gateway_status_topic(*args, "<gateway_id>"),
        contract.gateway_probe_topic(*args, "<gateway_id>"),
    ]
    filters = re.findall(r"^- `([^`]+)`:", _section(doc, "Subscribing"), re.M)
    assert filters == [contract.telemetry_filter(contract.DEFAULT_PREFIX),
                       contract.device_status_filter(contract.DEFAULT_PREFIX),
                       contract.gateway_status_filter(contract.DEFAULT_PREFIX),
                       contract.ota_progress_filter(contract.DEFAULT_PREFIX)]
    assert "kinhbac/mqtt_contract.py" in _section(doc, "Topics") or \
        "kinhbac/mqtt_contract.py" in doc.split("\n## ")[0]


def test_the_docs_telemetry_examples_are_what_the_module_builds():
    blocks = _json_blocks(_section(MQTT_MD.read_text(), "Telemetry"))
    assert len(blocks) == 3
    for block in blocks:
        doc = json.loads(block)
        message = contract.parse_telemetry(block)
        assert message.model_dump(exclude={"readings"}) == {k: v for k, v in doc.items()
                                                            if k != "readings"}
        readings = []
        for r in doc["readings"]:
            unsynced = r["ts"] is None
            readings.append(contract.reading_json(
                r["seq"], (contract.json_string(r["sensor"]), contract.json_string(r["unit"])),
                F32.unpack(F32.pack(r["value"]))[0], r["boot_ms"] if unsynced else r["ts"],
                unsynced, r["pre_sync"]))
        built = contract.telemetry_payload(
            device=doc["device"], site=doc["site"], gateway=doc["gateway"], boot=doc["boot"],
            seq=doc["seq"], replayed=doc["replayed"], readings=",".join(readings))
        assert json.loads(built) == doc
        # The page writes each value as the gateway does: the float32's shortest decimal.
        for line in block.splitlines():
            if '"value": ' in line:
                written = line.split('"value": ')[1].split(",")[0]
                assert contract.format_value(F32.unpack(F32.pack(float(written)))[0]) == written


def test_the_docs_device_status_examples_are_what_the_module_builds():
    blocks = _json_blocks(_section(MQTT_MD.read_text(), "Device status (retained)"))
    assert len(blocks) == 2
    for block in blocks:
        doc = json.loads(block)
        contract.parse_device_status(block)
        status = contract.device_status(
            device=doc["device"], site=doc["site"], gateway=doc["gateway"],
            last_seen_ms=doc["last_seen_ms"], firmware=doc["firmware"], boot=doc["boot"],
            reset_cause=doc["reset_cause"], drops=list(doc["drops"].values()),
            sensors=[(s["name"], s["unit"]) for s in doc["sensors"]],
            failures=None if "sensor_failures" not in doc else [
                [doc["sensor_failures"][s["name"]][n] for n in contract.FAILURE_NAMES]
                for s in doc["sensors"]],
            free_flash_bytes=doc["free_flash_bytes"])
        assert contract.device_status_payload(status).decode() == block.strip()


def test_the_docs_gateway_status_examples_are_what_the_module_builds():
    blocks = _json_blocks(_section(MQTT_MD.read_text(), "Gateway status"))
    lines = [line for block in blocks for line in block.strip().splitlines()]
    assert len(lines) == 8
    for line in lines:
        parsed = contract.parse_gateway_status(line)
        built = contract.gateway_status_payload(state=parsed.state, gateway=parsed.gateway,
                                                since_ms=parsed.since_ms, dropped=parsed.dropped,
                                                queue_depth=parsed.queue_depth,
                                                oldest_queued_ms=parsed.oldest_queued_ms)
        assert built.decode() == line


def test_the_module_needs_neither_aiomqtt_nor_the_database():
    import subprocess
    import sys

    code = ("import sys, kinhbac.mqtt_contract; "
            "print(sorted(m for m in ('aiomqtt', 'paho', 'sqlalchemy', 'sqlmodel') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
