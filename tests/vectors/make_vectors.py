"""Generate the golden frames in wire_v1.json and the HMAC vectors in rfc4231.json.

Run once, by hand, when the protocol changes (and bump the version if the bytes change):
    .venv/bin/python tests/vectors/make_vectors.py
Tests only read these files; they never regenerate them.
"""

import hashlib
import hmac
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from kinhbac import wire  # noqa: E402  (after the sys.path line: runs as a script)

KEY = {"device_id": "6b62000102030405", "key_id": 1, "secret": bytes(range(32)).hex()}
OTHER_KEY = {"device_id": "6b620a0b0c0d0e0f", "key_id": 0xFFFE, "secret": "a5" * 20}  # the last device key id
# A site's claim key as the fleet issues it (a string; its UTF-8 bytes are the HMAC key).
CLAIM_SECRET = b"golden-claim-key-of-a-test-site_".hex()
CLAIM_KEY = {"device_id": "6b62000102030405", "key_id": wire.CLAIM_KEY_ID, "secret": CLAIM_SECRET}
CLAIM_NONCE = bytes(range(0xA0, 0xB0)).hex()
CLAIMED_KEY = {
    "device_id": "6b62000102030405",
    "key_id": 2,
    "secret": wire.claim_secret(bytes.fromhex(CLAIM_SECRET), bytes.fromhex("6b62000102030405"),
                                bytes.fromhex(CLAIM_NONCE)).hex(),
}
BASE_MS = 1767225600000  # 2026-01-01T00:00:00Z

CASES = [
    {
        "name": "hello_sensor_table",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 3, "counter": 1},
        "fields": {
            "fw_version": "1.2.0",
            "reset_cause": wire.RESET_POWER_ON,
            "drops": [0, 2, 0],
            "sensors": [["temperature", "degC"], ["humidity", "%RH"], ["pm2_5", "µg/m³"]],
        },
    },
    {
        "name": "hello_no_sensors",
        "type": "HELLO",
        "key": OTHER_KEY,
        "header": {"boot": 4294967295, "counter": 268435455},
        "fields": {
            "fw_version": "",
            "reset_cause": wire.RESET_WATCHDOG,
            "drops": [],
            "sensors": [],
        },
    },
    {
        "name": "readings_synced",
        "type": "READINGS",
        "key": KEY,
        "header": {"boot": 3, "counter": 2},
        "fields": {
            "readings_boot": 3,
            "first_seq": 1,
            "base_ms": BASE_MS,
            "unsynced": False,
            "pre_sync": False,
            "readings": [[0, 0, 21.5], [1, 0, 55.25], [2, 3, -3.75], [0, 1000, 1013.25]],
        },
    },
    {
        "name": "readings_taken_before_clock_sync",
        "type": "READINGS",
        "key": KEY,
        "header": {"boot": 3, "counter": 4},
        "fields": {
            "readings_boot": 3,
            "first_seq": 0,
            "base_ms": BASE_MS - 5000,
            "unsynced": False,
            "pre_sync": True,
            "readings": [[0, 0, 20.25], [1, 10, 50.5]],
        },
    },
    {
        "name": "readings_unsynced_resent_after_reboot",
        "type": "READINGS",
        "key": KEY,
        "header": {"boot": 4, "counter": 9},
        "fields": {
            "readings_boot": 3,
            "first_seq": 4294967294,
            "base_ms": 65000,
            "unsynced": True,
            "pre_sync": False,
            "readings": [[255, 65534, 0.0], [7, 65535, -1.5]],
        },
    },
    {
        "name": "readings_max_frame",
        "type": "READINGS",
        "key": KEY,
        "header": {"boot": 3, "counter": 3},
        "fields": {
            "readings_boot": 3,
            "first_seq": 5,
            "base_ms": BASE_MS + 1500,
            "unsynced": False,
            "pre_sync": False,
            "readings": [[i % 4, i * 5, i * 0.5 - 40.0] for i in range(wire.MAX_READINGS)],
        },
    },
    {
        "name": "ack_readings_and_time",
        "type": "ACK",
        "key": KEY,
        "header": {"boot": 3, "counter": 2 * 16 + 0},
        "fields": {"readings_boot": 3, "through_seq": 4, "gateway_time_ms": BASE_MS + 123},
    },
    {
        "name": "ack_time_only",
        "type": "ACK",
        "key": KEY,
        "header": {"boot": 3, "counter": 1 * 16 + 0},
        "fields": {"readings_boot": None, "through_seq": None, "gateway_time_ms": BASE_MS},
    },
    {
        "name": "ack_readings_gateway_clock_unsynced",
        "type": "ACK",
        "key": OTHER_KEY,
        "header": {"boot": 0, "counter": 268435455 * 16 + 15},
        "fields": {"readings_boot": 4294967295, "through_seq": 0, "gateway_time_ms": None},
    },
    {
        "name": "error_down_busy",
        "type": "ERROR_DOWN",
        "key": KEY,
        "header": {"boot": 3, "counter": 3 * 16 + 0},
        "fields": {"reason": wire.BUSY, "ref": 3, "detail": "queue full"},
    },
    {
        "name": "error_down_stale_boot",
        "type": "ERROR_DOWN",
        "key": KEY,
        "header": {"boot": 2, "counter": 7 * 16 + 0},
        "fields": {"reason": wire.STALE_BOOT, "ref": 41, "detail": ""},
    },
    {
        "name": "error_up_config_refused",
        "type": "ERROR_UP",
        "key": KEY,
        "header": {"boot": 3, "counter": 4},
        "fields": {"reason": wire.BAD_PAYLOAD, "ref": 49, "detail": "unknown setting"},
    },
    {
        "name": "config_settings",
        "type": "CONFIG",
        "key": KEY,
        # One key per object: MicroPython's dict order is not insertion order.
        "header": {"boot": 3, "counter": 3 * 16 + 1},
        "fields": {"settings": {"sampling": {"interval_ms": [1000, 1000, 60000]}}},
    },
    {
        "name": "claim",
        "type": "CLAIM",
        "key": CLAIM_KEY,
        "header": {"boot": 1, "counter": 1},
        "fields": {"nonce": CLAIM_NONCE, "fw_version": "0.1.0"},
    },
    {
        "name": "identity_after_approval",
        "type": "IDENTITY",
        "key": CLAIMED_KEY,
        # How the key's secret is derived: checked on both interpreters.
        "claim": {"claim_key": CLAIM_SECRET, "nonce": CLAIM_NONCE},
        "header": {"boot": 1, "counter": 2 * 16},
        "fields": {},
    },
]


# Frames a receiver must refuse, with the reason: each is encoded like a case above (its bytes
# pinned the same way) and decoded to that refusal, on both interpreters.
REFUSALS = [
    {
        "name": "hello_under_the_claim_key_refused",
        "type": "HELLO",
        "key": CLAIM_KEY,  # the site's claim key may sign a CLAIM, and speak for no device
        "header": {"boot": 1, "counter": 2},
        "fields": {"fw_version": "0.1.0", "reset_cause": 1, "drops": [0, 0, 0],
                   "sensors": [["temperature", "C"]]},
        "refused": "BAD_KEY_ID",
    },
    {
        "name": "readings_under_the_claim_key_refused",
        "type": "READINGS",
        "key": CLAIM_KEY,
        "header": {"boot": 1, "counter": 3},
        "fields": {"readings_boot": 1, "first_seq": 4294967295, "base_ms": 1795917262089,
                   "unsynced": False, "pre_sync": False, "readings": [[0, 0, 21.5]]},
        "refused": "BAD_KEY_ID",
    },
]


def encode_case(case):
    k = case["key"]
    key = wire.Key(bytes.fromhex(k["device_id"]), k["key_id"], bytes.fromhex(k["secret"]))
    h, f, t = case["header"], case["fields"], case["type"]
    if t == "HELLO":
        sensors = [tuple(s) for s in f["sensors"]]
        args = (f["fw_version"], f["reset_cause"], f["drops"], sensors)
        return wire.encode_hello(key, h["boot"], h["counter"], *args)
    if t == "READINGS":
        readings = [tuple(r) for r in f["readings"]]
        args = (f["readings_boot"], f["first_seq"], f["base_ms"], f["unsynced"], readings)
        return wire.encode_readings(key, h["boot"], h["counter"], *args, f["pre_sync"])
    if t == "ACK":
        args = (f["readings_boot"], f["through_seq"], f["gateway_time_ms"])
        return wire.encode_ack(key, h["boot"], h["counter"], *args)
    if t in ("ERROR_DOWN", "ERROR_UP"):
        args = (f["reason"], f["ref"], f["detail"], t == "ERROR_DOWN")
        return wire.encode_error(key, h["boot"], h["counter"], *args)
    if t == "CONFIG":
        return wire.encode_config(key, h["boot"], h["counter"], f["settings"])
    if t == "CLAIM":
        return wire.encode_claim(key, h["boot"], h["counter"], bytes.fromhex(f["nonce"]),
                                 f["fw_version"])
    if t == "IDENTITY":
        return wire.encode_identity(key, h["boot"], h["counter"])
    raise ValueError(t)


# RFC 4231 section 4 inputs; outputs computed by CPython's own hmac module.
RFC4231 = [
    ("1", "0b" * 20, b"Hi There".hex(), None),
    ("2", b"Jefe".hex(), b"what do ya want for nothing?".hex(), None),
    ("3", "aa" * 20, "dd" * 50, None),
    ("4", bytes(range(1, 26)).hex(), "cd" * 50, None),
    ("5", "0c" * 20, b"Test With Truncation".hex(), 16),
    ("6", "aa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First".hex(), None),
    (
        "7",
        "aa" * 131,
        (
            b"This is a test using a larger than block-size key and a larger than block-size "
            b"data. The key needs to be hashed before being used by the HMAC algorithm."
        ).hex(),
        None,
    ),
]


def main():
    vectors = []
    for case in CASES:
        frame = encode_case(case)
        vectors.append(dict(case, hex=frame.hex(), length=len(frame)))
    # One case per line: diffs stay readable when a case changes.
    lines = [json.dumps(v, ensure_ascii=False) for v in vectors]
    text = '{"version": %d,\n "generated_by": "tests/vectors/make_vectors.py",\n "cases": [\n' % (
        wire.VERSION
    )
    refusals = [json.dumps(dict(c, hex=encode_case(c).hex()), ensure_ascii=False)
                for c in REFUSALS]
    (HERE / "wire_v1.json").write_text(text + ",\n".join(lines) + '\n],\n "refusals": [\n'
                                       + ",\n".join(refusals) + "\n]}\n", encoding="utf-8")

    rfc = []
    for name, key, data, trunc in RFC4231:
        mac = hmac.new(bytes.fromhex(key), bytes.fromhex(data), hashlib.sha256).digest()
        rfc.append({"case": name, "key": key, "data": data, "hmac": mac[: trunc or 32].hex()})
    (HERE / "rfc4231.json").write_text(json.dumps({"hmac_sha256": rfc}, indent=1) + "\n")
    print("wrote", len(vectors), "frames and", len(rfc), "HMAC vectors")


if __name__ == "__main__":
    main()
