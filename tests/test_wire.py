"""The wire codec on CPython: behaviour by example, replay rules, HMAC, and the spec's figures."""

import ast
import hashlib
import hmac
import json
import re
import struct
from pathlib import Path

import pytest

from kinhbac import wire

ROOT = Path(__file__).resolve().parents[1]
WIRE_PY = ROOT / "kinhbac" / "wire.py"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
VECTORS = ROOT / "tests" / "vectors"

DEVICE = bytes.fromhex("6b62000102030405")
SECRET = bytes(range(32))
KEY = wire.Key(DEVICE, 1, SECRET)


def lookup(device_id, key_id):
    if device_id != DEVICE:
        return None
    return KEY if key_id == 1 else wire.UNKNOWN_KEY


def reason_of(frame, guard=None, downlink=False, lookup=lookup):
    """The reason name decode() refuses frame with (fails the test if it is accepted)."""
    guard = (
        guard if guard is not None else (wire.DownlinkGuard(3) if downlink else wire.ReplayGuard())
    )
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(frame, lookup, guard, downlink)
    return refused.value.name


def readings_frame(counter=1, boot=3, readings_boot=3, first_seq=1, n=20):
    readings = [(i % 3, i * 5, 20.0 + i) for i in range(n)]
    return wire.encode_readings(
        KEY, boot, counter, readings_boot, first_seq, 1_000, False, readings
    )


def node_guard(boot=3, sent=1):
    """A node's DownlinkGuard that has sent uplink counters 1..sent."""
    guard = wire.DownlinkGuard(boot)
    for _ in range(sent):
        guard.next_counter()
    return guard


# ---- Round trips and the node's writer ------------------------------------------------------


def test_readings_frame_decodes_to_its_batch():
    frame = readings_frame(counter=7, first_seq=100)
    m = wire.decode(frame, lookup, wire.ReplayGuard())
    assert isinstance(m, wire.ReadingsMessage)
    assert (m.device_id, m.key_id, m.boot, m.counter) == (DEVICE, 1, 3, 7)
    assert (m.readings_boot, m.first_seq, m.last_seq, m.base_ms, m.unsynced) == (
        3,
        100,
        119,
        1000,
        False,
    )
    assert m.readings == [(i % 3, i * 5, 20.0 + i) for i in range(20)]


def test_hello_carries_sensor_table_drops_and_reset_cause():
    sensors = [("temperature", "degC"), ("pm2_5", "µg/m³")]
    frame = wire.encode_hello(KEY, 9, 1, "1.2.0", wire.RESET_WATCHDOG, [5, 0, 7], sensors)
    m = wire.decode(frame, lookup, wire.ReplayGuard())
    assert (m.fw_version, m.reset_cause, m.drops, m.sensors) == ("1.2.0", 3, [5, 0, 7], sensors)
    assert m.boot == 9 and m.type_name == "HELLO"


def test_hello_carries_each_sensors_failure_counts_or_none_without_the_section():
    sensors = [("temperature", "C"), ("level", "m")]
    failures = [(3, 0), (0, 2**32 - 1)]
    frame = wire.encode_hello(KEY, 9, 1, "0.1.0", wire.RESET_POWER_ON, [0] * 7, sensors,
                              failures)
    m = wire.decode(frame, lookup, wire.ReplayGuard())
    assert (m.sensors, m.failures) == (sensors, failures)
    older = wire.encode_hello(KEY, 9, 2, "0.1.0", wire.RESET_POWER_ON, [0] * 7, sensors)
    m = wire.decode(older, lookup, wire.ReplayGuard())
    assert (m.sensors, m.failures) == (sensors, None)
    assert len(frame) - len(older) == 1 + 8 * len(sensors)


def resigned_hello(payload, counter=1):
    """A HELLO frame around `payload`, signed with KEY: what a buggy node could send."""
    head = struct.pack(">BBH8sHII", 1, wire.HELLO, wire.MIN_FRAME + len(payload), DEVICE, 1, 9,
                       counter)
    return head + payload + KEY.signer.mac(head + payload)


@pytest.mark.parametrize("cut", ["count for another table", "a byte short", "a byte over",
                                 "count alone"])
def test_hello_whose_failure_counts_do_not_fit_its_sensor_table_is_refused_as_bad_payload(cut):
    sensors = [("temperature", "C"), ("level", "m")]
    frame = wire.encode_hello(KEY, 9, 1, "0.1.0", 0, [], sensors, [(3, 0), (0, 2)])
    payload = frame[wire.HEADER_SIZE:-wire.MAC_SIZE]
    table, section = payload[:-17], payload[-17:]
    assert section[0] == 2
    malformed = {
        "count for another table": table + b"\x01" + section[1:9],
        "a byte short": payload[:-1],
        "a byte over": payload + b"\x00",
        "count alone": table + b"\x02",
    }[cut]
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(resigned_hello(malformed), lookup, wire.ReplayGuard())
    assert refused.value.name == "BAD_PAYLOAD"
    assert refused.value.header[0] == wire.HELLO  # authentic: the gateway may answer it


def test_hello_failure_counts_are_one_pair_per_sensor_within_u32():
    sensors = [("temperature", "C"), ("level", "m")]
    for failures in ([(1, 0)], [(1, 0), (0, 0), (0, 0)], [(1, 0), (0, 2**32)],
                     [(1, 0), (-1, 0)]):
        with pytest.raises(wire.FrameError) as refused:
            wire.encode_hello(KEY, 9, 1, "0.1.0", 0, [], sensors, failures)
        assert refused.value.reason == wire.BAD_PAYLOAD


def test_hello_carries_the_nodes_free_flash_after_its_failure_counts():
    sensors = [("temperature", "C"), ("level", "m")]
    failures = [(0, 0), (1, 0)]
    frame = wire.encode_hello(KEY, 9, 1, "0.2.0", wire.RESET_SOFT, [0] * 7, sensors, failures,
                              413_696)
    m = wire.decode(frame, lookup, wire.ReplayGuard())
    assert (m.sensors, m.failures, m.free_flash) == (sensors, failures, 413_696)
    without = wire.encode_hello(KEY, 9, 2, "0.2.0", wire.RESET_SOFT, [0] * 7, sensors, failures)
    assert len(frame) - len(without) == 4
    assert frame[wire.HEADER_SIZE:-wire.MAC_SIZE].endswith(struct.pack(">I", 413_696))


@pytest.mark.parametrize("failures", [None, [(0, 0), (1, 0)]], ids=["oldest", "with counts"])
def test_a_hello_from_firmware_before_the_free_flash_section_still_decodes_with_none(failures):
    sensors = [("temperature", "C"), ("level", "m")]
    older = wire.encode_hello(KEY, 9, 1, "0.1.0", wire.RESET_POWER_ON, [0] * 7, sensors, failures)
    m = wire.decode(older, lookup, wire.ReplayGuard())
    assert (m.failures, m.free_flash) == (failures, None)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8])
def test_a_hello_whose_free_flash_section_is_not_four_bytes_is_refused_as_bad_payload(cut):
    # What a gateway must not take as a figure: a section cut short, or with bytes after it.
    frame = wire.encode_hello(KEY, 9, 1, "0.2.0", 0, [], [("level", "m")], [(0, 0)], 2**32 - 1)
    payload = frame[wire.HEADER_SIZE:-wire.MAC_SIZE]
    counts_end = len(payload) - 4
    malformed = payload[:counts_end + cut] if cut < 4 else payload + b"\xff" * (cut - 4)
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(resigned_hello(malformed), lookup, wire.ReplayGuard())
    assert refused.value.name == "BAD_PAYLOAD"
    assert refused.value.header[0] == wire.HELLO


@pytest.mark.parametrize("free_flash, failures", [(-1, [(0, 0)]), (2**32, [(0, 0)]),
                                                  (True, [(0, 0)]), (4096, None)],
                         ids=["negative", "past u32", "a bool", "without failure counts"])
def test_hello_free_flash_is_a_u32_that_follows_the_failure_counts(free_flash, failures):
    with pytest.raises(wire.FrameError) as refused:
        wire.encode_hello(KEY, 9, 1, "0.2.0", 0, [], [("level", "m")], failures, free_flash)
    assert refused.value.reason == wire.BAD_PAYLOAD


def test_ack_without_readings_or_time_decodes_to_none_fields():
    frame = wire.encode_ack(KEY, 3, wire.downlink_counter(1, 0))
    m = wire.decode(frame, lookup, node_guard(), downlink=True)
    assert (m.readings_boot, m.through_seq, m.gateway_time_ms) == (None, None, None)


def test_ack_needs_both_readings_fields_or_neither():
    with pytest.raises(wire.FrameError) as refused:
        wire.encode_ack(KEY, 3, 16, readings_boot=3)
    assert refused.value.reason == wire.BAD_PAYLOAD


def test_config_round_trips_a_json_object():
    settings = {"interval_ms": 500, "sensors": {"pm2_5": False}, "name": "pump-7"}
    frame = wire.encode_config(KEY, 3, 16, settings)
    assert wire.decode(frame, lookup, node_guard(), downlink=True).settings == settings


def test_error_frames_carry_reason_ref_and_detail_both_ways():
    down = wire.encode_error(KEY, 3, 16, wire.BUSY, 1, "disk full")
    m = wire.decode(down, lookup, node_guard(), downlink=True)
    assert (m.type, m.reason_name, m.ref, m.detail) == (wire.ERROR_DOWN, "BUSY", 1, "disk full")
    up = wire.encode_error(KEY, 3, 2, wire.UNSUPPORTED, 16, "no such setting", downlink=False)
    m = wire.decode(up, lookup, wire.ReplayGuard())
    assert (m.type, m.reason, m.ref, m.detail) == (
        wire.ERROR_UP,
        wire.UNSUPPORTED,
        16,
        "no such setting",
    )


def test_resend_after_lost_ack_is_a_new_frame_with_the_same_readings():
    writer = wire.ReadingsWriter(KEY)
    writer.begin(3, 50, 1_000)
    for i in range(5):
        assert writer.add(0, i, float(i))
    first = bytes(writer.finish(3, 4))
    resent = bytes(writer.finish(4, 1))  # the ACK was lost and the node rebooted meanwhile
    guard = wire.ReplayGuard()
    a = wire.decode(first, lookup, guard)
    b = wire.decode(resent, lookup, guard)
    assert first != resent
    assert (a.boot, a.counter) != (b.boot, b.counter)
    assert (a.readings_boot, a.first_seq, a.readings) == (b.readings_boot, b.first_seq, b.readings)


def test_writer_refuses_a_reading_outside_the_batch_span():
    writer = wire.ReadingsWriter(KEY)
    writer.begin(3, 1, 1_000)
    assert writer.add(0, wire.MAX_OFFSET_MS, 1.0)
    assert not writer.add(0, wire.MAX_OFFSET_MS + 1, 1.0)
    assert not writer.add(0, -1, 1.0)
    assert writer.count == 1


def test_writer_refuses_a_reading_when_the_frame_is_full():
    writer = wire.ReadingsWriter(KEY)
    writer.begin(3, 1, 1_000)
    added = sum(writer.add(1, 0, 0.5) for _ in range(wire.MAX_READINGS + 5))
    assert added == wire.MAX_READINGS
    assert len(writer.finish(3, 1)) == wire.MAX_FRAME


def test_writer_in_a_small_buffer_holds_fewer_readings():
    writer = wire.ReadingsWriter(KEY, bytearray(wire.MIN_FRAME + wire.READINGS_HEAD_SIZE + 3 * 7))
    writer.begin(3, 1, 1_000)
    assert [writer.add(0, 0, 1.0) for _ in range(4)] == [True, True, True, False]


def test_values_beyond_float32_become_infinities():
    frame = readings_frame(n=1)
    writer = wire.ReadingsWriter(KEY)
    writer.begin(3, 1, 0)
    writer.add(0, 0, 1e300)
    writer.add(0, 0, -1e300)
    frame = bytes(writer.finish(3, 1))
    values = [r[2] for r in wire.decode(frame, lookup, wire.ReplayGuard()).readings]
    assert values == [float("inf"), float("-inf")]


def test_empty_batch_cannot_be_encoded():
    writer = wire.ReadingsWriter(KEY)
    writer.begin(3, 1, 0)
    with pytest.raises(wire.FrameError) as refused:
        writer.finish(3, 1)
    assert refused.value.reason == wire.BAD_PAYLOAD


def test_batch_whose_seqs_would_wrap_cannot_be_encoded():
    with pytest.raises(wire.FrameError):
        wire.encode_readings(KEY, 3, 1, 3, 2**32 - 1, 0, False, [(0, 0, 1.0), (0, 1, 2.0)])


def test_encoders_refuse_out_of_range_fields_instead_of_truncating():
    # MicroPython's struct would silently truncate these; the codec checks them itself.
    with pytest.raises(wire.FrameError):
        wire.encode_ack(KEY, 2**32, 16)
    with pytest.raises(wire.FrameError):
        wire.Key(DEVICE, 70_000, SECRET)
    with pytest.raises(wire.FrameError):
        wire.encode_hello(KEY, 3, 1, "x" * 256, 0, [], [])
    with pytest.raises(wire.FrameError):
        wire.encode_readings(KEY, 3, 1, 3, 1, 0, False, [(256, 0, 1.0)])


def test_frame_over_max_frame_cannot_be_encoded():
    with pytest.raises(wire.FrameError) as refused:
        wire.encode_config(KEY, 3, 16, {"blob": "x" * wire.MAX_PAYLOAD})
    assert refused.value.reason == wire.BAD_LENGTH


def test_uplink_counter_zero_and_past_the_downlink_range_cannot_be_encoded():
    with pytest.raises(wire.FrameError):
        readings_frame(counter=0)
    with pytest.raises(wire.FrameError):
        readings_frame(counter=wire.MAX_UPLINK_COUNTER + 1)


def test_short_secrets_are_refused():
    with pytest.raises(wire.FrameError):
        wire.Key(DEVICE, 1, b"too short")


# ---- Refusals by example -------------------------------------------------------------------


def test_replayed_frame_is_refused():
    guard = wire.ReplayGuard()
    frame = readings_frame(counter=5)
    wire.decode(frame, lookup, guard)
    assert reason_of(frame, guard) == "REPLAY"


def test_older_counter_in_the_same_boot_is_refused():
    guard = wire.ReplayGuard()
    wire.decode(readings_frame(counter=5), lookup, guard)
    assert reason_of(readings_frame(counter=4), guard) == "REPLAY"


def test_frame_from_an_older_boot_is_refused():
    guard = wire.ReplayGuard()
    wire.decode(readings_frame(boot=4, counter=1), lookup, guard)
    assert reason_of(readings_frame(boot=3, counter=99), guard) == "STALE_BOOT"


def test_new_boot_accepts_counters_from_one_again():
    guard = wire.ReplayGuard()
    wire.decode(readings_frame(boot=3, counter=500), lookup, guard)
    assert wire.decode(readings_frame(boot=4, counter=1), lookup, guard).counter == 1


def test_new_key_id_starts_a_fresh_replay_window():
    key2 = wire.Key(DEVICE, 2, b"\x42" * 32)
    guard = wire.ReplayGuard()
    wire.decode(readings_frame(counter=900), lookup, guard)
    frame = wire.encode_readings(key2, 3, 1, 3, 1, 0, False, [(0, 0, 1.0)])
    m = wire.decode(frame, lambda d, k: key2 if k == 2 else None, guard)
    assert (m.key_id, m.counter) == (2, 1)


def test_retired_key_id_is_refused_as_unknown_key():
    old = wire.encode_readings(wire.Key(DEVICE, 0, SECRET), 3, 1, 3, 1, 0, False, [(0, 0, 1.0)])
    assert reason_of(old) == "UNKNOWN_KEY"


def test_unknown_device_is_refused():
    other = wire.Key(b"\xff" * 8, 1, SECRET)
    assert (
        reason_of(wire.encode_readings(other, 3, 1, 3, 1, 0, False, [(0, 0, 1.0)]))
        == "UNKNOWN_DEVICE"
    )


def test_forged_mac_is_refused_and_does_not_move_the_replay_window():
    guard = wire.ReplayGuard()
    forged = readings_frame(counter=10)[:-16] + bytes(16)
    assert reason_of(forged, guard) == "BAD_MAC"
    assert guard.latest(DEVICE, 1) is None
    assert wire.decode(readings_frame(counter=9), lookup, guard).counter == 9


def test_frame_signed_with_another_secret_is_refused():
    impostor = wire.Key(DEVICE, 1, b"\x00" * 32)
    frame = wire.encode_readings(impostor, 3, 1, 3, 1, 0, False, [(0, 0, 1.0)])
    assert reason_of(frame) == "BAD_MAC"


def test_unknown_version_is_refused():
    frame = bytearray(readings_frame())
    frame[0] = 2
    assert reason_of(bytes(frame)) == "BAD_VERSION"


def test_unassigned_type_codes_are_refused_as_bad_type():
    for code in (0x00, 0x05, 0x10, 0x12, 0x7F, 0x80, 0x87, 0x91, 0x93, 0xFF):
        assert code not in wire.TYPE_NAMES
        frame = bytearray(readings_frame())
        frame[1] = code
        assert reason_of(bytes(frame), downlink=bool(code & 0x80)) == "BAD_TYPE"


def test_uplink_frame_reflected_to_the_node_is_refused():
    assert reason_of(readings_frame(), downlink=True) == "BAD_TYPE"
    assert reason_of(wire.encode_ack(KEY, 3, 16, 3, 1, 5)) == "BAD_TYPE"


def test_authentic_frame_with_malformed_payload_is_refused_as_bad_payload():
    # A buggy node: READINGS whose count disagrees with the length, correctly signed.
    frame = bytearray(readings_frame(n=2))
    frame[wire.HEADER_SIZE + 17] = 3
    frame[-16:] = KEY.signer.mac(bytes(frame[:-16]))
    assert reason_of(bytes(frame)) == "BAD_PAYLOAD"


def test_config_that_is_not_a_json_object_is_refused_as_bad_payload():
    body = b"[1, 2]"
    length = wire.MIN_FRAME + len(body)
    head = struct.pack(">BBH8sHII", 1, wire.CONFIG, length, DEVICE, 1, 3, 16)
    frame = head + body + KEY.signer.mac(head + body)
    assert reason_of(frame, guard=node_guard(), downlink=True) == "BAD_PAYLOAD"


def test_refusal_carries_the_header_it_read():
    frame = readings_frame(counter=5)
    guard = wire.ReplayGuard()
    wire.decode(frame, lookup, guard)
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(frame, lookup, guard)
    assert refused.value.header == (wire.READINGS, DEVICE, 1, 3, 5)
    assert "REPLAY" in str(refused.value)


def test_failing_lookup_becomes_an_internal_refusal():
    def broken(device_id, key_id):
        raise KeyError("database gone")

    with pytest.raises(wire.FrameError) as refused:
        wire.decode(readings_frame(), broken, wire.ReplayGuard())
    assert refused.value.reason == wire.INTERNAL


def test_non_bytes_input_is_refused_not_crashed():
    for junk in (None, 42, "text", [1, 2, 3]):
        with pytest.raises(wire.FrameError):
            wire.decode(junk, lookup, wire.ReplayGuard())


def test_lookup_may_return_raw_secret_or_signer():
    for found in (SECRET, wire.Signer(SECRET)):
        m = wire.decode(readings_frame(), lambda d, k, found=found: found, wire.ReplayGuard())
        assert m.counter == 1


# ---- Downlink replay rule -------------------------------------------------------------------


def test_node_refuses_a_replayed_downlink_frame():
    guard = node_guard(sent=2)
    ack = wire.encode_ack(KEY, 3, wire.downlink_counter(2, 0), 3, 10, 5)
    wire.decode(ack, lookup, guard, downlink=True)
    assert reason_of(ack, guard, downlink=True) == "REPLAY"


def test_node_accepts_honest_downlink_frames_after_a_gateway_restart():
    guard = node_guard(sent=1)
    # Before the restart the gateway answered uplink 1 twice (ACK, CONFIG).
    for n in range(2):
        wire.decode(
            wire.encode_ack(KEY, 3, wire.downlink_counter(1, n)), lookup, guard, downlink=True
        )
    # The restarted gateway kept nothing; the node reconnects with a HELLO (counter 2),
    # and the gateway's first answer derives from it.
    hello_counter = guard.next_counter()
    fresh = wire.encode_ack(KEY, 3, wire.downlink_counter(hello_counter, 0), None, None, 123)
    assert wire.decode(fresh, lookup, guard, downlink=True).gateway_time_ms == 123


def test_node_refuses_a_downlink_frame_from_a_previous_boot():
    old = wire.encode_ack(KEY, 2, wire.downlink_counter(1, 0))
    assert reason_of(old, node_guard(boot=3), downlink=True) == "STALE_BOOT"


def test_node_refuses_a_downlink_frame_answering_an_uplink_not_yet_sent():
    ahead = wire.encode_ack(KEY, 3, wire.downlink_counter(5, 0))
    assert reason_of(ahead, node_guard(sent=4), downlink=True) == "REPLAY"


def test_downlink_counters_are_sixteen_answers_per_uplink_counter():
    assert wire.downlink_counter(1, 0) == 16
    assert wire.downlink_counter(2, 15) == 47
    for bad in ((0, 0), (1, 16), (wire.MAX_UPLINK_COUNTER + 1, 0)):
        with pytest.raises(wire.FrameError):
            wire.downlink_counter(*bad)
    assert wire.downlink_counter(wire.MAX_UPLINK_COUNTER, 15) == 2**32 - 1


def test_node_counters_stop_where_downlink_counters_would_overflow():
    guard = wire.DownlinkGuard(1)
    guard.last_sent = wire.MAX_UPLINK_COUNTER - 1
    assert guard.next_counter() == wire.MAX_UPLINK_COUNTER
    with pytest.raises(wire.FrameError):
        guard.next_counter()


# ---- Replay guard state ----------------------------------------------------------------------


def test_replay_guard_state_survives_export_and_import():
    guard = wire.ReplayGuard()
    wire.decode(readings_frame(boot=3, counter=8), lookup, guard)
    state = json.loads(json.dumps(guard.export_state()))  # what a gateway would persist
    assert state == [["6b62000102030405", 1, 3, 8]]
    restored = wire.ReplayGuard()
    restored.import_state(state)
    assert reason_of(readings_frame(boot=3, counter=8), restored) == "REPLAY"
    assert wire.decode(readings_frame(boot=3, counter=9), lookup, restored).counter == 9


def test_import_never_moves_a_window_backwards():
    guard = wire.ReplayGuard()
    guard.commit(DEVICE, 1, 5, 10)
    guard.import_state([[DEVICE.hex(), 1, 4, 99], [DEVICE.hex(), 1, 5, 3]])
    assert guard.latest(DEVICE, 1) == (5, 10)


def test_check_does_not_commit():
    guard = wire.ReplayGuard()
    guard.check(DEVICE, 1, 3, 5)
    guard.check(DEVICE, 1, 3, 5)
    assert guard.latest(DEVICE, 1) is None


# ---- Framing -----------------------------------------------------------------------------------


def test_frame_length_reads_the_total_length_from_the_header():
    frame = readings_frame()
    assert wire.frame_length(frame[: wire.HEADER_SIZE]) == len(frame) == 196


def test_frame_length_refuses_bad_versions_and_lengths():
    head = bytearray(readings_frame()[: wire.HEADER_SIZE])
    for length, reason in (
        (wire.MAX_FRAME + 1, wire.BAD_LENGTH),
        (wire.MIN_FRAME - 1, wire.BAD_LENGTH),
    ):
        head[2:4] = length.to_bytes(2, "big")
        with pytest.raises(wire.FrameError) as refused:
            wire.frame_length(bytes(head))
        assert refused.value.reason == reason
    head[0] = 9
    with pytest.raises(wire.FrameError) as refused:
        wire.frame_length(bytes(head))
    assert refused.value.reason == wire.BAD_VERSION
    with pytest.raises(wire.FrameError):
        wire.frame_length(b"\x01\x02")


def test_frames_read_back_to_back_from_a_stream():
    stream = (
        readings_frame(counter=1) + readings_frame(counter=2, n=3) + readings_frame(counter=3, n=1)
    )
    guard, counters, pos = wire.ReplayGuard(), [], 0
    while pos < len(stream):
        n = wire.frame_length(stream[pos : pos + wire.HEADER_SIZE])
        counters.append(wire.decode(stream[pos : pos + n], lookup, guard).counter)
        pos += n
    assert counters == [1, 2, 3]


# ---- HMAC ------------------------------------------------------------------------------------


def rfc4231():
    return json.loads((VECTORS / "rfc4231.json").read_text())["hmac_sha256"]


def test_rfc4231_vector_file_holds_the_published_values():
    published = {  # RFC 4231 section 4.2, 4.3, 4.6
        "1": "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        "2": "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        "5": "a3b6167473100ee06e0c796c2955552b",
    }
    stored = {v["case"]: v["hmac"] for v in rfc4231()}
    assert {k: stored[k] for k in published} == published


@pytest.mark.parametrize("has_copy", [True, False], ids=["copied-state", "padded-keys"])
def test_hmac_matches_rfc4231_on_both_code_paths(monkeypatch, has_copy):
    monkeypatch.setattr(wire, "_HAS_COPY", has_copy)
    for v in rfc4231():
        mac = wire.hmac_sha256(bytes.fromhex(v["key"]), bytes.fromhex(v["data"]))
        assert mac.hex()[: len(v["hmac"])] == v["hmac"], v["case"]


@pytest.mark.parametrize("has_copy", [True, False], ids=["copied-state", "padded-keys"])
def test_signer_agrees_with_stdlib_hmac(monkeypatch, has_copy):
    monkeypatch.setattr(wire, "_HAS_COPY", has_copy)
    for secret in (b"", b"k" * 16, bytes(range(64)), bytes(range(200))):
        signer = wire.Signer(secret)
        for data in (b"", b"x", bytes(range(256)) * 5):
            want = hmac.new(secret, data, hashlib.sha256).digest()
            assert signer.digest(data) == signer.digest(memoryview(bytearray(data))) == want
            assert signer.mac(data) == want[:16]
            assert signer.verify(data, want[:16])
            assert not signer.verify(data, bytes(16))
            assert not signer.verify(data, want[:15])


# ---- Reason codes and names --------------------------------------------------------------


def test_frame_error_names_its_reason():
    err = wire.FrameError(wire.BAD_MAC, "MAC does not verify")
    assert (err.reason, err.name, err.message, str(err)) == (
        6,
        "BAD_MAC",
        "MAC does not verify",
        "BAD_MAC: MAC does not verify",
    )
    assert wire.reason_name(200) == "REASON_200"
    assert wire.type_name(0x7F) == "TYPE_0x7f"


def test_reason_codes_are_distinct_and_include_the_gateways_own():
    assert len(set(wire.REASON_NAMES)) == len(wire.REASON_NAMES)
    for name in (
        "BAD_LENGTH",
        "BAD_VERSION",
        "BAD_TYPE",
        "UNKNOWN_DEVICE",
        "UNKNOWN_KEY",
        "BAD_MAC",
        "STALE_BOOT",
        "REPLAY",
        "BAD_PAYLOAD",
        "BUSY",
        "INTERNAL",
    ):
        assert wire.REASON_NAMES[getattr(wire, name)] == name


# ---- The spec and the code agree -------------------------------------------------------------


def doc_table(heading_regex, columns):
    """Rows of the first markdown table after a heading matching heading_regex."""
    text = PROTOCOL_MD.read_text()
    start = re.search(heading_regex, text, re.MULTILINE).end()
    rows = []
    for line in text[start:].splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")][:columns])
        elif rows and not line.startswith("|"):
            break
    return rows[1:]


def test_doc_figures_match_the_encoder():
    figures = {
        label: int(re.match(r"\d+", value).group())
        for label, value in doc_table("^## Key figures", 2)
    }
    twenty = readings_frame(n=20)
    measured = {
        "Header size (`HEADER_SIZE`)": wire.HEADER_SIZE,
        "MAC size": len(KEY.signer.mac(b"")),
        "Smallest frame (empty payload)": len(wire.encode_config(KEY, 3, 16, {})) - len(b"{}"),
        "Largest frame (`MAX_FRAME`)": wire.MAX_FRAME,
        "READINGS fixed part of the payload": len(readings_frame(n=1)) - 7 - wire.MIN_FRAME,
        "Bytes per reading": len(readings_frame(n=2)) - len(readings_frame(n=1)),
        "READINGS frame with 20 readings": len(twenty),
        "Readings per frame, at most": wire.MAX_READINGS,
        "ACK frame": len(wire.encode_ack(KEY, 3, 16, 3, 1, 5)),
        "Batch span (`MAX_OFFSET_MS`)": wire.MAX_OFFSET_MS,
        "OTA chunk data, at most (`OTA_MAX_CHUNK`)": wire.OTA_MAX_CHUNK,
        "OTA_CHUNK frame with a full chunk": len(
            wire.encode_ota_chunk(KEY, 3, 16, 7, 0, 0, bytes(wire.OTA_MAX_CHUNK))),
        "OTA_CHUNK_REQUEST frame": len(wire.encode_ota_chunk_request(KEY, 3, 1, 7, 0, 0, 1)),
    }
    assert figures == measured
    assert len(readings_frame(n=wire.MAX_READINGS)) <= wire.MAX_FRAME
    with pytest.raises(wire.FrameError):
        readings_frame(n=wire.MAX_READINGS + 1)


def test_doc_reason_code_table_matches_the_codec():
    rows = doc_table(r"^## Order of checks and reason codes", 2)
    assert {int(code): name for code, name in rows} == wire.REASON_NAMES


def test_doc_frame_type_table_matches_the_codec():
    rows = doc_table(r"^### Frame types", 3)
    assert {int(code, 16): name for code, name, _ in rows} == wire.TYPE_NAMES
    for code, name, direction in rows:
        assert direction == ("downlink" if int(code, 16) & 0x80 else "uplink"), name


def test_doc_hello_counter_table_matches_the_codec():
    rows = doc_table(r"^Drop counters are cumulative since provisioning", 3)
    positions = list(range(len(wire.DROP_NAMES)))
    assert [int(position) for position, _, _ in rows] == positions
    assert [getattr(wire, constant) for _, constant, _ in rows] == positions
    assert tuple(name for _, _, name in rows) == wire.DROP_NAMES


def test_the_firmware_keeps_a_counter_for_each_position_the_wire_names():
    state_py = (ROOT / "firmware" / "node" / "state.py").read_text()
    counters = re.search(r"^COUNTERS = const\((\d+)\)", state_py, re.MULTILINE)
    assert counters and int(counters.group(1)) == len(wire.DROP_NAMES)


def test_header_layout_is_the_documented_one():
    # Built from the doc's header table by hand, independently of the encoder.
    payload = struct.pack(">BIIQ", 3, 3, 4, 5)
    head = struct.pack(">BBH8sHII", 1, 0x83, 22 + len(payload) + 16, DEVICE, 1, 3, 16)
    mac = hmac.new(SECRET, head + payload, hashlib.sha256).digest()[:16]
    assert wire.encode_ack(KEY, 3, 16, 3, 4, 5) == head + payload + mac


def test_readings_layout_is_the_documented_one():
    readings = [(2, 65535, -1.5), (255, 0, 1013.25)]
    payload = struct.pack(">IIBQB", 7, 41, 1, 123_456, 2)
    payload += b"".join(struct.pack(">BHf", *r) for r in readings)
    head = struct.pack(">BBH8sHII", 1, 0x02, 22 + len(payload) + 16, DEVICE, 1, 8, 9)
    mac = hmac.new(SECRET, head + payload, hashlib.sha256).digest()[:16]
    assert wire.encode_readings(KEY, 8, 9, 7, 41, 123_456, True, readings) == head + payload + mac


def test_hello_layout_is_the_documented_one():
    # Built from the doc's HELLO table by hand, failure counts included.
    payload = bytes([3]) + b"\x050.1.0" + bytes([2]) + struct.pack(">II", 7, 0)
    payload += bytes([1]) + b"\x05level\x01m"
    payload += bytes([1]) + struct.pack(">II", 4, 9)
    head = struct.pack(">BBH8sHII", 1, 0x01, 22 + len(payload) + 16, DEVICE, 1, 8, 9)
    mac = hmac.new(SECRET, head + payload, hashlib.sha256).digest()[:16]
    assert wire.encode_hello(KEY, 8, 9, "0.1.0", 3, [7, 0], [("level", "m")],
                             [(4, 9)]) == head + payload + mac
    # And the free flash section after the failure counts: one u32.
    payload += struct.pack(">I", 262_144)
    head = struct.pack(">BBH8sHII", 1, 0x01, 22 + len(payload) + 16, DEVICE, 1, 8, 10)
    mac = hmac.new(SECRET, head + payload, hashlib.sha256).digest()[:16]
    assert wire.encode_hello(KEY, 8, 10, "0.1.0", 3, [7, 0], [("level", "m")],
                             [(4, 9)], 262_144) == head + payload + mac


# ---- The common subset -----------------------------------------------------------------------


def test_wire_py_stays_in_the_micropython_subset():
    tree = ast.parse(WIRE_PY.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        assert not isinstance(node, (ast.JoinedStr, ast.AnnAssign)), ast.dump(node)
        if isinstance(node, (ast.FunctionDef, ast.arg)):
            assert (
                getattr(node, "returns", None) is None and getattr(node, "annotation", None) is None
            )
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in ("from_bytes", "to_bytes", "hex", "fromhex"), (
                node.func.attr
            )
    assert imported <= {"hashlib", "json", "struct", "micropython", "binascii"}, imported
