"""Generate the golden frames in wire_v1.json and the HMAC vectors in rfc4231.json.

Run once, by hand, when the protocol changes (and bump the version if the bytes change):
    .venv/bin/python tests/vectors/make_vectors.py
Tests only read these files; they never regenerate them.
"""

import hashlib
import hmac
import json
import struct
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


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


APP_FILES = [  # a bundle release: (path, size, SHA-256), an empty file among them
    ["/lib/node/app.mpy", 7104, sha256_hex(b"app")],
    ["/lib/wire.mpy", 20560, sha256_hex(b"wire")],
    ["/lib/node/__init__.mpy", 0, sha256_hex(b"")],
]
# The most files of 17-byte paths one offer holds: 12 + 25 x 54 bytes, MAX_PAYLOAD exactly.
FULL_OFFER = [["/lib/node/m%02d.mpy" % i, 1000 + i, sha256_hex(bytes([i]))] for i in range(25)]
CHUNK = (bytes(range(256)) * 4).hex()  # a whole chunk: OTA_MAX_CHUNK bytes

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
            "failures": None,  # a node before HELLO's failure counts: still a valid HELLO
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
            "failures": None,
        },
    },
    {
        "name": "hello_sensor_failures",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 5, "counter": 1},
        "fields": {
            "fw_version": "0.1.0",
            "reset_cause": wire.RESET_POWER_ON,
            "drops": [0, 0, 6, 4294967295, 0, 0, 0],
            # An unplugged BME280's two fields, and an ADC input driven past its range.
            "sensors": [["temperature", "C"], ["humidity", "%RH"], ["level", "m"]],
            "failures": [[3, 0], [3, 0], [0, 4294967295]],
        },
    },
    {
        "name": "hello_sensor_failures_of_no_sensors",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 5, "counter": 2},
        "fields": {"fw_version": "0.1.0", "reset_cause": wire.RESET_SOFT, "drops": [],
                   "sensors": [], "failures": []},
    },
    {
        # The free flash section (after the failure counts): what an update may use, as the
        # node works it out (littlefs's free blocks less the reading buffer's promise and two
        # blocks), here an emulated board's 413,696 bytes.
        "name": "hello_free_flash",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 6, "counter": 1},
        "fields": {
            "fw_version": "0.2.0",
            "reset_cause": wire.RESET_SOFT,
            "drops": [0, 0, 0, 0, 0, 0, 0],
            "sensors": [["temperature", "C"], ["level", "m"]],
            "failures": [[0, 0], [1, 0]],
            "free_flash": 413696,
        },
    },
    {
        "name": "hello_free_flash_of_no_sensors_at_the_u32_limit",
        "type": "HELLO",
        "key": OTHER_KEY,
        "header": {"boot": 1, "counter": 1},
        "fields": {"fw_version": "0.2.0", "reset_cause": wire.RESET_POWER_ON, "drops": [],
                   "sensors": [], "failures": [], "free_flash": 4294967295},
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
    {
        "name": "ota_offer_bundle",
        "type": "OTA_OFFER",
        "key": KEY,
        # Answers the node's uplink 5 after its ACK (answer 0).
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "fields": {"ref": 7, "kind": wire.OTA_BUNDLE, "version": "0.2.0", "files": APP_FILES},
    },
    {
        "name": "ota_offer_image",
        "type": "OTA_OFFER",
        "key": OTHER_KEY,
        "header": {"boot": 4294967295, "counter": 268435455 * 16 + 15},
        # The image fills ESP32_GENERIC-OTA's 1.5 MiB slot.
        "fields": {"ref": 4294967295, "kind": wire.OTA_IMAGE, "version": "1.27.0-kinhbac.3",
                   "files": [["micropython.bin", 1572864, sha256_hex(b"image")]]},
    },
    {
        "name": "ota_offer_fills_a_frame",
        "type": "OTA_OFFER",
        "key": KEY,
        "header": {"boot": 3, "counter": 6 * 16 + 1},
        "fields": {"ref": 8, "kind": wire.OTA_BUNDLE, "version": "0.3.0", "files": FULL_OFFER},
    },
    {
        "name": "ota_chunk_request",
        "type": "OTA_CHUNK_REQUEST",
        "key": KEY,
        "header": {"boot": 3, "counter": 7},
        "fields": {"ref": 7, "file_index": 0, "offset": 1024, "length": 1024},
    },
    {
        "name": "ota_chunk_request_up_to_the_last_u32_offset",
        "type": "OTA_CHUNK_REQUEST",
        "key": OTHER_KEY,
        "header": {"boot": 1, "counter": 2},
        "fields": {"ref": 4294967295, "file_index": 255, "offset": 4294967295 - 1023,
                   "length": 1024},
    },
    {
        "name": "ota_chunk_full",
        "type": "OTA_CHUNK",
        "key": KEY,
        "header": {"boot": 3, "counter": 7 * 16},
        "fields": {"ref": 7, "file_index": 0, "offset": 1024, "data": CHUNK},
    },
    {
        "name": "ota_chunk_last_byte_of_a_file",
        "type": "OTA_CHUNK",
        "key": KEY,
        "header": {"boot": 3, "counter": 8 * 16},
        "fields": {"ref": 7, "file_index": 1, "offset": 20559, "data": "ff"},
    },
    {
        "name": "ota_result_downloading",
        "type": "OTA_RESULT",
        "key": KEY,
        "header": {"boot": 3, "counter": 9},
        "fields": {"ref": 7, "state": wire.OTA_DOWNLOADING, "bytes_done": 3072, "reason": ""},
    },
    {
        "name": "ota_result_rolled_back",
        "type": "OTA_RESULT",
        "key": KEY,
        "header": {"boot": 7, "counter": 1},
        "fields": {"ref": 7, "state": wire.OTA_ROLLED_BACK, "bytes_done": 27664,
                   "reason": "3 trial boots: ImportError: no module named 'node.app'"},
    },
    {
        "name": "ota_result_state_of_a_later_firmware",
        "type": "OTA_RESULT",
        "key": KEY,
        "header": {"boot": 7, "counter": 2},
        # Receivers keep state codes they do not know, as they do reason codes.
        "fields": {"ref": 7, "state": 200, "bytes_done": 4294967295, "reason": "é"},
    },
]


OFFER_HEAD = struct.pack(">IB", 7, wire.OTA_BUNDLE) + b"\x050.2.0"


def offer_file(path, size, digest_hex):
    """One file of an OTA_OFFER, by the doc's table: path str8, size u32, SHA-256."""
    return bytes([len(path)]) + path.encode() + struct.pack(">I", size) + bytes.fromhex(digest_hex)


OFFER_FILES = b"".join(offer_file(*f) for f in APP_FILES[:2])


# Frames a receiver must refuse, with the reason: each is encoded like a case above (its bytes
# pinned the same way) and decoded to that refusal, on both interpreters.
REFUSALS = [
    # OTA frames that are authentic (signed with the device's key) but malformed, each built
    # by hand from the docs' tables: no encoder makes them.
    {
        "name": "ota_offer_file_list_overruns_the_payload_refused",
        "type": "OTA_OFFER",
        "key": KEY,
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "payload": (OFFER_HEAD + bytes([3]) + OFFER_FILES).hex(),  # 3 files, 2 there
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_offer_cut_inside_a_sha256_refused",
        "type": "OTA_OFFER",
        "key": KEY,
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "payload": (OFFER_HEAD + bytes([2]) + OFFER_FILES[:-1]).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_offer_of_no_files_refused",
        "type": "OTA_OFFER",
        "key": KEY,
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "payload": (OFFER_HEAD + bytes([0])).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_offer_image_of_two_files_refused",
        "type": "OTA_OFFER",
        "key": KEY,
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "payload": (struct.pack(">IB", 7, wire.OTA_IMAGE) + b"\x050.2.0" + bytes([2])
                    + OFFER_FILES).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_offer_of_an_unknown_kind_refused",
        "type": "OTA_OFFER",
        "key": KEY,
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "payload": (struct.pack(">IB", 7, 3) + b"\x050.2.0" + bytes([1])
                    + offer_file(*APP_FILES[0])).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_offer_with_a_trailing_byte_refused",
        "type": "OTA_OFFER",
        "key": KEY,
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "payload": (OFFER_HEAD + bytes([2]) + OFFER_FILES + b"\x00").hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_chunk_request_truncated_refused",
        "type": "OTA_CHUNK_REQUEST",
        "key": KEY,
        "header": {"boot": 3, "counter": 7},
        "payload": struct.pack(">IBIH", 7, 0, 1024, 1024)[:-1].hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_chunk_request_of_0_bytes_refused",
        "type": "OTA_CHUNK_REQUEST",
        "key": KEY,
        "header": {"boot": 3, "counter": 7},
        "payload": struct.pack(">IBIH", 7, 0, 1024, 0).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_chunk_request_over_1024_bytes_refused",
        "type": "OTA_CHUNK_REQUEST",
        "key": KEY,
        "header": {"boot": 3, "counter": 7},
        "payload": struct.pack(">IBIH", 7, 0, 0, wire.OTA_MAX_CHUNK + 1).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_chunk_oversize_refused",
        "type": "OTA_CHUNK",
        "key": KEY,
        "header": {"boot": 3, "counter": 7 * 16},
        "payload": (struct.pack(">IBI", 7, 0, 0) + bytes(wire.OTA_MAX_CHUNK + 1)).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_chunk_of_0_bytes_refused",
        "type": "OTA_CHUNK",
        "key": KEY,
        "header": {"boot": 3, "counter": 7 * 16},
        "payload": struct.pack(">IBI", 7, 0, 1024).hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_chunk_past_the_last_u32_offset_refused",
        "type": "OTA_CHUNK",
        "key": KEY,
        "header": {"boot": 3, "counter": 7 * 16},
        "payload": (struct.pack(">IBI", 7, 0, 4294967295) + b"\x00\x00").hex(),
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "ota_result_truncated_refused",
        "type": "OTA_RESULT",
        "key": KEY,
        "header": {"boot": 3, "counter": 9},
        "payload": (struct.pack(">IBI", 7, wire.OTA_FAILED, 0) + b"\x05sha").hex(),
        "refused": "BAD_PAYLOAD",
    },
    # A downlink OTA frame sent to the gateway, an uplink one to the node: the direction bit is
    # under the MAC, so neither side can be made to take the other's frame.
    {
        "name": "ota_offer_sent_uplink_refused",
        "type": "OTA_OFFER",
        "sent": "uplink",
        "key": KEY,
        "header": {"boot": 3, "counter": 5 * 16 + 1},
        "fields": {"ref": 7, "kind": wire.OTA_BUNDLE, "version": "0.2.0", "files": APP_FILES},
        "refused": "BAD_TYPE",
    },
    {
        "name": "ota_chunk_request_sent_downlink_refused",
        "type": "OTA_CHUNK_REQUEST",
        "sent": "downlink",
        "key": KEY,
        "header": {"boot": 3, "counter": 7},
        "fields": {"ref": 7, "file_index": 0, "offset": 1024, "length": 1024},
        "refused": "BAD_TYPE",
    },
    {
        "name": "ota_offer_under_the_claim_key_refused",
        "type": "OTA_OFFER",
        "key": CLAIM_KEY,  # downlink, the claim key signs only the ERROR answering a CLAIM
        "header": {"boot": 1, "counter": 2 * 16},
        "fields": {"ref": 7, "kind": wire.OTA_BUNDLE, "version": "0.2.0", "files": APP_FILES},
        "refused": "BAD_KEY_ID",
    },
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
    # HELLO's failure counts must cover the sensor table exactly: signed frames whose section
    # does not (no encoder makes them), built from hello_sensor_failures' payload below.
    {
        "name": "hello_failures_of_another_table_refused",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 5, "counter": 3},
        "cut": "count 2 for a table of 3, and two pairs",
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "hello_failures_cut_short_refused",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 5, "counter": 4},
        "cut": "the last pair's last byte missing",
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "hello_failures_and_a_trailing_byte_refused",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 5, "counter": 5},
        "cut": "one byte after the section",
        "refused": "BAD_PAYLOAD",
    },
    # The free flash section is four bytes exactly: built from hello_free_flash's payload.
    {
        "name": "hello_free_flash_cut_short_refused",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 6, "counter": 2},
        "cut": "the section's last byte missing",
        "refused": "BAD_PAYLOAD",
    },
    {
        "name": "hello_free_flash_and_a_trailing_byte_refused",
        "type": "HELLO",
        "key": KEY,
        "header": {"boot": 6, "counter": 3},
        "cut": "one byte after the section",
        "refused": "BAD_PAYLOAD",
    },
]


def _malformed_payloads():
    """The payloads of the HELLO section refusals: the failure counts' from
    hello_sensor_failures' (3 sensors), the free flash's from hello_free_flash's."""
    case = next(c for c in CASES if c["name"] == "hello_sensor_failures")
    payload = encode_case(case)[wire.HEADER_SIZE:-wire.MAC_SIZE]
    section = payload[-25:]  # count, then three (u32, u32) pairs
    assert section[0] == 3
    table = payload[:-25]
    case = next(c for c in CASES if c["name"] == "hello_free_flash")
    with_free_flash = encode_case(case)[wire.HEADER_SIZE:-wire.MAC_SIZE]
    return {
        "hello_failures_of_another_table_refused": table + bytes([2]) + section[1:17],
        "hello_failures_cut_short_refused": payload[:-1],
        "hello_failures_and_a_trailing_byte_refused": payload + b"\x00",
        "hello_free_flash_cut_short_refused": with_free_flash[:-1],
        "hello_free_flash_and_a_trailing_byte_refused": with_free_flash + b"\x00",
    }


def encode_case(case):
    k = case["key"]
    key = wire.Key(bytes.fromhex(k["device_id"]), k["key_id"], bytes.fromhex(k["secret"]))
    h, t = case["header"], case["type"]
    if "payload" in case:  # a malformed payload, signed: what no encoder makes
        code = next(c for c, name in wire.TYPE_NAMES.items() if name == t)
        return wire._frame(code, key, h["boot"], h["counter"], bytes.fromhex(case["payload"]))
    f = case["fields"]
    if t == "HELLO":
        sensors = [tuple(s) for s in f["sensors"]]
        args = (f["fw_version"], f["reset_cause"], f["drops"], sensors, f.get("failures"),
                f.get("free_flash"))
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
    if t == "OTA_OFFER":
        files = [(p, size, bytes.fromhex(digest)) for p, size, digest in f["files"]]
        return wire.encode_ota_offer(key, h["boot"], h["counter"], f["ref"], f["kind"],
                                     f["version"], files)
    if t == "OTA_CHUNK_REQUEST":
        args = (f["ref"], f["file_index"], f["offset"], f["length"])
        return wire.encode_ota_chunk_request(key, h["boot"], h["counter"], *args)
    if t == "OTA_CHUNK":
        args = (f["ref"], f["file_index"], f["offset"], bytes.fromhex(f["data"]))
        return wire.encode_ota_chunk(key, h["boot"], h["counter"], *args)
    if t == "OTA_RESULT":
        args = (f["ref"], f["state"], f["bytes_done"], f["reason"])
        return wire.encode_ota_result(key, h["boot"], h["counter"], *args)
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
    payloads = _malformed_payloads()
    for case in REFUSALS:
        if case["name"] in payloads:
            case["payload"] = payloads[case["name"]].hex()
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
