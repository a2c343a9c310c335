"""The OTA frames from the attacker's side: what a node refuses of the offers and chunks it is
sent, what a gateway refuses of the requests and results, by someone without the device's key
or with a recording of its traffic; and what the codec leaves to its caller, with the fields
the caller needs. The bytes are pinned by tests/vectors on both interpreters; the layouts here
are built by hand from docs/protocol.md's tables."""

import hashlib
import hmac
import re
import struct
from pathlib import Path

import pytest

from kinhbac import wire

ROOT = Path(__file__).resolve().parents[1]
DEVICE = bytes.fromhex("6b62000102030405")
SECRET = bytes(range(32))
KEY = wire.Key(DEVICE, 1, SECRET)
APP = [("/lib/node/app.mpy", 7104, hashlib.sha256(b"app").digest()),
       ("/lib/wire.mpy", 20560, hashlib.sha256(b"wire").digest())]


def lookup(device_id, key_id):
    if device_id != DEVICE:
        return None
    return KEY if key_id == 1 else wire.UNKNOWN_KEY


def node(boot=3, sent=1):
    """A node's DownlinkGuard for `boot` that has sent uplink counters 1..sent."""
    guard = wire.DownlinkGuard(boot)
    guard.last_sent = sent
    return guard


def offer(key=KEY, boot=3, counter=1 * 16 + 1, ref=7, files=APP):
    return wire.encode_ota_offer(key, boot, counter, ref, wire.OTA_BUNDLE, "0.2.0", files)


def refusal(frame, guard, downlink=True, lookup=lookup):
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(frame, lookup, guard, downlink)
    return refused.value.name


# ---- The node and the offers and chunks it is sent -------------------------------------------


def test_an_offer_forged_without_the_devices_key_is_refused_and_moves_nothing():
    guard = node()
    assert refusal(offer(wire.Key(DEVICE, 1, bytes(32))), guard) == "BAD_MAC"
    tampered = bytearray(offer())
    tampered[-wire.MAC_SIZE - 1] ^= 0x01  # the last byte of the last file's SHA-256
    assert refusal(bytes(tampered), guard) == "BAD_MAC"
    # Every claiming board of the site holds the claim key: it can offer no firmware.
    claim = wire.Key(DEVICE, wire.CLAIM_KEY_ID, b"the site's claim key")
    assert refusal(offer(claim), guard, lookup=wire.lookup_for(claim)) == "BAD_KEY_ID"
    assert guard.last_received == 0
    assert wire.decode(offer(), lookup, guard, True).files == APP


def test_a_recorded_offer_sent_again_is_refused_in_the_same_boot_and_after_a_restart():
    guard = node()
    recorded = offer()
    wire.decode(recorded, lookup, guard, True)
    assert refusal(recorded, guard) == "REPLAY"
    assert refusal(recorded, node(boot=4, sent=9)) == "STALE_BOOT"
    # Nor can a gateway be tricked into an offer ahead of the node: it answers no uplink sent.
    assert refusal(offer(counter=2 * 16 + 1), node(sent=1)) == "REPLAY"


def test_ota_frames_sent_the_wrong_way_are_refused_by_either_side():
    request = wire.encode_ota_chunk_request(KEY, 3, 1, 7, 0, 0, 1024)
    result = wire.encode_ota_result(KEY, 3, 2, 7, wire.OTA_CONFIRMED, 27664)
    chunk = wire.encode_ota_chunk(KEY, 3, 16, 7, 0, 0, b"\x00")
    for frame in (request, result):  # a node's own frames, reflected back to it
        assert refusal(frame, node(sent=2)) == "BAD_TYPE"
    for frame in (offer(), chunk):  # the gateway's, sent to a gateway
        assert refusal(frame, wire.ReplayGuard(), downlink=False) == "BAD_TYPE"


# ---- The gateway and the requests and results it is sent --------------------------------------


def test_a_recorded_chunk_request_or_result_sent_again_is_refused_and_a_forged_one_too():
    guard = wire.ReplayGuard()
    request = wire.encode_ota_chunk_request(KEY, 3, 2, 7, 0, 0, 1024)
    result = wire.encode_ota_result(KEY, 3, 3, 7, wire.OTA_DOWNLOADING, 1024)
    for frame in (request, result):
        wire.decode(frame, lookup, guard)
    assert refusal(request, guard, downlink=False) == "REPLAY"
    assert refusal(result, guard, downlink=False) == "REPLAY"
    older_boot = wire.encode_ota_result(KEY, 2, 99, 7, wire.OTA_FAILED, 0, "flash full")
    assert refusal(older_boot, guard, downlink=False) == "STALE_BOOT"
    # A "confirmed" for a node that never installed anything, without its key.
    forged = wire.encode_ota_result(wire.Key(DEVICE, 1, bytes(32)), 3, 4, 7, wire.OTA_CONFIRMED,
                                    27664)
    assert refusal(forged, guard, downlink=False) == "BAD_MAC"
    assert guard.latest(DEVICE, 1) == (3, 3)


# ---- What the codec leaves to its caller ---------------------------------------------------------


def fits(offer_msg, chunk_msg):
    """The node's check of a chunk against the offer it holds (docs/protocol.md, OTA_CHUNK)."""
    if chunk_msg.ref != offer_msg.ref or chunk_msg.file_index >= len(offer_msg.files):
        return False
    return chunk_msg.offset + len(chunk_msg.data) <= offer_msg.files[chunk_msg.file_index][1]


def test_a_chunk_for_a_file_past_the_offer_is_authentic_and_its_fields_give_it_away():
    guard = node(sent=3)
    held = wire.decode(offer(), lookup, guard, True)  # two files
    chunks = [  # (file index, offset, bytes, release ref), answering uplinks 2 and 3
        (1, 20559, 1, 7),  # the last byte of the second file
        (2, 0, 1024, 7),  # a third file, which the offer does not have
        (0, 7103, 2, 7),  # past the first file's end
        (0, 0, 1024, 8),  # another release
    ]
    decoded = [wire.decode(wire.encode_ota_chunk(KEY, 3, 2 * 16 + i, ref, index, offset,
                                                 bytes(n)), lookup, guard, True)
               for i, (index, offset, n, ref) in enumerate(chunks)]
    assert [(m.file_index, m.offset, len(m.data), m.ref) for m in decoded] == chunks
    assert [fits(held, m) for m in decoded] == [True, False, False, False]


def test_a_chunks_data_is_a_view_into_the_frame_buffer_not_a_copy():
    # The node reads every frame into one buffer: a 1 KiB chunk costs no second KiB.
    data = bytes(range(256)) * 4
    buf = bytearray(wire.encode_ota_chunk(KEY, 3, 16, 7, 0, 0, data))
    m = wire.decode(memoryview(buf), lookup, node(), True)
    assert bytes(m.data) == data
    buf[wire.HEADER_SIZE + 9] = 0xAA  # the next frame read into the buffer
    assert m.data[0] == 0xAA


# ---- The encoders refuse what the decoders would --------------------------------------------


def full_offer(n):
    return [("/lib/node/m%02d.mpy" % i, 1000, bytes(32)) for i in range(n)]


@pytest.mark.parametrize("what, encode", [
    ("an offer past MAX_PAYLOAD", lambda: offer(files=full_offer(26))),
    ("an offer of no files", lambda: offer(files=[])),
    ("an image of two files",
     lambda: wire.encode_ota_offer(KEY, 3, 17, 7, wire.OTA_IMAGE, "1", APP)),
    ("an unknown kind", lambda: wire.encode_ota_offer(KEY, 3, 17, 7, 3, "1", APP[:1])),
    ("a file without a path", lambda: offer(files=[("", 1, bytes(32))])),
    ("a short SHA-256", lambda: offer(files=[("/a", 1, bytes(31))])),
    ("a size past u32", lambda: offer(files=[("/a", 2**32, bytes(32))])),
    ("a ref past u32", lambda: offer(ref=2**32)),
    ("a request for 0 bytes", lambda: wire.encode_ota_chunk_request(KEY, 3, 1, 7, 0, 0, 0)),
    ("a request for 1025 bytes",
     lambda: wire.encode_ota_chunk_request(KEY, 3, 1, 7, 0, 0, wire.OTA_MAX_CHUNK + 1)),
    ("a request past 2**32",
     lambda: wire.encode_ota_chunk_request(KEY, 3, 1, 7, 0, 2**32 - 1, 2)),
    ("a file index past u8", lambda: wire.encode_ota_chunk_request(KEY, 3, 1, 7, 256, 0, 1)),
    ("a chunk of 0 bytes", lambda: wire.encode_ota_chunk(KEY, 3, 16, 7, 0, 0, b"")),
    ("a chunk of 1025 bytes",
     lambda: wire.encode_ota_chunk(KEY, 3, 16, 7, 0, 0, bytes(wire.OTA_MAX_CHUNK + 1))),
    ("a state past u8", lambda: wire.encode_ota_result(KEY, 3, 1, 7, 256, 0)),
    ("bytes so far below 0", lambda: wire.encode_ota_result(KEY, 3, 1, 7, 1, -1)),
    ("a reason past 255 bytes", lambda: wire.encode_ota_result(KEY, 3, 1, 7, 6, 0, "x" * 256)),
])
def test_encoders_refuse_what_does_not_fit_or_is_malformed(what, encode):
    with pytest.raises(wire.FrameError) as refused:
        encode()
    assert refused.value.reason == wire.BAD_PAYLOAD, what


def test_an_offer_of_25_files_with_17_byte_paths_fills_one_frame():
    assert len(offer(files=full_offer(25))) == wire.MAX_FRAME


# ---- The documented layouts ----------------------------------------------------------------------


def signed(frame_type, boot, counter, payload):
    """A frame built from docs/protocol.md's header table, independently of the encoder."""
    head = struct.pack(">BBH8sHII", 1, frame_type, 22 + len(payload) + 16, DEVICE, 1, boot,
                       counter)
    return head + payload + hmac.new(SECRET, head + payload, hashlib.sha256).digest()[:16]


def test_ota_layouts_are_the_documented_ones():
    path, size, digest = APP[0]
    payload = struct.pack(">IB", 7, 1) + b"\x050.2.0" + bytes([1])
    payload += bytes([len(path)]) + path.encode() + struct.pack(">I", size) + digest
    assert offer(files=APP[:1]) == signed(0x90, 3, 17, payload)
    assert wire.encode_ota_chunk_request(KEY, 3, 2, 7, 1, 4096, 1024) == signed(
        0x11, 3, 2, struct.pack(">IBIH", 7, 1, 4096, 1024))
    assert wire.encode_ota_chunk(KEY, 3, 32, 7, 1, 4096, b"abc") == signed(
        0x92, 3, 32, struct.pack(">IBI", 7, 1, 4096) + b"abc")
    assert wire.encode_ota_result(KEY, 3, 3, 7, 6, 2048, "bad sha") == signed(
        0x13, 3, 3, struct.pack(">IBI", 7, 6, 2048) + b"\x07bad sha")


def test_the_documented_ota_states_are_the_codecs_and_the_device_state_machines():
    text = (ROOT / "docs" / "protocol.md").read_text()
    start = re.search(r"^States, the node's steps", text, re.MULTILINE).end()
    rows = []
    for line in text[start:].splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")][:3])
        elif rows and not line.startswith("|"):
            break
    rows = rows[1:]
    assert {int(code): name for code, _, name in rows} == wire.OTA_STATE_NAMES
    assert all(getattr(wire, constant) == int(code) for code, constant, _ in rows)
    machine = (ROOT / "docs" / "ota.md").read_text().split("device:", 1)[1].split("```", 1)[0]
    assert all(name in machine for name in wire.OTA_STATE_NAMES.values())
