"""Properties of the codec over generated frames: round trips, refusals with the right reason."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kinhbac import wire

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "vectors" / "wire_v1.json").read_text(encoding="utf-8"))[
    "cases"
]

U32 = 2**32 - 1
FAST = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)

key_parts = st.tuples(
    st.binary(min_size=8, max_size=8),
    st.integers(0, 0xFFFF),
    st.binary(min_size=16, max_size=100),  # over 64 bytes: HMAC hashes the key first
)
u32s = st.integers(0, U32)
uplink_counters = st.integers(1, wire.MAX_UPLINK_COUNTER)
downlink_counters = st.integers(wire.DOWNLINK_ANSWERS, U32)
texts = st.text(max_size=24)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def ota_offer_fields(draw):
    kind = draw(st.sampled_from([wire.OTA_BUNDLE, wire.OTA_IMAGE]))
    a_file = st.tuples(st.text(min_size=1, max_size=24), u32s,
                       st.binary(min_size=32, max_size=32))
    top = 1 if kind == wire.OTA_IMAGE else 30  # past 30 they rarely fit: the vectors fill one
    files = draw(st.lists(a_file, min_size=1, max_size=top))
    return {"ref": draw(u32s), "kind": kind, "version": draw(texts), "files": files}


@st.composite
def ota_span(draw):
    """An offset and a length (1..OTA_MAX_CHUNK) that stay within a u32-sized file."""
    length = draw(st.integers(1, wire.OTA_MAX_CHUNK))
    return draw(st.integers(0, U32 - length + 1)), length


@st.composite
def ota_chunk_request_fields(draw):
    offset, length = draw(ota_span())
    return {"ref": draw(u32s), "file_index": draw(st.integers(0, 255)), "offset": offset,
            "length": length}


@st.composite
def ota_chunk_fields(draw):
    offset, length = draw(ota_span())
    return {"ref": draw(u32s), "file_index": draw(st.integers(0, 255)), "offset": offset,
            "data": draw(st.binary(min_size=length, max_size=length))}


@st.composite
def readings_fields(draw):
    reading = st.tuples(
        st.integers(0, 255),
        st.integers(0, wire.MAX_OFFSET_MS),
        st.floats(width=32, allow_nan=False),
    )
    # Mostly short batches (generation cost); the golden vectors hold a full 192-reading frame.
    readings = draw(st.lists(reading, min_size=1, max_size=wire.MAX_READINGS))
    return {
        "readings_boot": draw(u32s),
        "first_seq": draw(st.integers(0, U32 - len(readings) + 1)),
        "base_ms": draw(st.integers(0, 2**64 - 1)),
        "unsynced": (unsynced := draw(st.booleans())),
        "pre_sync": not unsynced and draw(st.booleans()),
        "readings": readings,
    }


@st.composite
def ack_fields(draw):
    acked = draw(st.none() | st.tuples(u32s, u32s))
    return {
        "readings_boot": None if acked is None else acked[0],
        "through_seq": None if acked is None else acked[1],
        "gateway_time_ms": draw(st.none() | st.integers(0, 2**64 - 1)),
    }


@st.composite
def hello_fields(draw):
    sensors = draw(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=8)), max_size=16))
    return {
        "fw_version": draw(texts),
        "reset_cause": draw(st.integers(0, 255)),
        "drops": draw(st.lists(u32s, max_size=16)),
        "sensors": sensors,
        "failures": draw(st.none() | st.lists(st.tuples(u32s, u32s), min_size=len(sensors),
                                              max_size=len(sensors))),
    }


error_fields = st.fixed_dictionaries({"reason": st.integers(0, 255), "ref": u32s, "detail": texts})
FIELDS = {
    wire.HELLO: hello_fields(),
    wire.READINGS: readings_fields(),
    wire.ERROR_UP: error_fields,
    wire.ACK: ack_fields(),
    wire.ERROR_DOWN: error_fields,
    wire.CONFIG: st.fixed_dictionaries(
        {"settings": st.dictionaries(st.text(max_size=10), json_values, max_size=6)}
    ),
    wire.CLAIM: st.fixed_dictionaries(
        {"nonce": st.binary(min_size=wire.CLAIM_NONCE_SIZE, max_size=wire.CLAIM_NONCE_SIZE),
         "fw_version": texts}
    ),
    wire.IDENTITY: st.fixed_dictionaries({}),
    wire.OTA_OFFER: ota_offer_fields(),
    wire.OTA_CHUNK_REQUEST: ota_chunk_request_fields(),
    wire.OTA_CHUNK: ota_chunk_fields(),
    wire.OTA_RESULT: st.fixed_dictionaries(
        {"ref": u32s, "state": st.integers(0, 255), "bytes_done": u32s, "reason": texts}
    ),
}


def encode(ftype, key, boot, counter, f):
    if ftype == wire.HELLO:
        return wire.encode_hello(
            key, boot, counter, f["fw_version"], f["reset_cause"], f["drops"], f["sensors"],
            f.get("failures"),
        )
    if ftype == wire.READINGS:
        args = (f["readings_boot"], f["first_seq"], f["base_ms"], f["unsynced"], f["readings"])
        return wire.encode_readings(key, boot, counter, *args, f["pre_sync"])
    if ftype == wire.ACK:
        return wire.encode_ack(
            key, boot, counter, f["readings_boot"], f["through_seq"], f["gateway_time_ms"]
        )
    if ftype in (wire.ERROR_UP, wire.ERROR_DOWN):
        return wire.encode_error(
            key, boot, counter, f["reason"], f["ref"], f["detail"], ftype == wire.ERROR_DOWN
        )
    if ftype == wire.CLAIM:
        return wire.encode_claim(key, boot, counter, f["nonce"], f["fw_version"])
    if ftype == wire.IDENTITY:
        return wire.encode_identity(key, boot, counter)
    if ftype == wire.OTA_OFFER:
        return wire.encode_ota_offer(key, boot, counter, f["ref"], f["kind"], f["version"],
                                     f["files"])
    if ftype == wire.OTA_CHUNK_REQUEST:
        return wire.encode_ota_chunk_request(key, boot, counter, f["ref"], f["file_index"],
                                             f["offset"], f["length"])
    if ftype == wire.OTA_CHUNK:
        return wire.encode_ota_chunk(key, boot, counter, f["ref"], f["file_index"], f["offset"],
                                     f["data"])
    if ftype == wire.OTA_RESULT:
        return wire.encode_ota_result(key, boot, counter, f["ref"], f["state"], f["bytes_done"],
                                      f["reason"])
    return wire.encode_config(key, boot, counter, f["settings"])


def key_for(ftype, device_id, key_id, secret):
    """CLAIM frames are signed under the claim key id; the claim key id signs nothing else but
    a downlink ERROR (the answer to a CLAIM)."""
    if ftype == wire.CLAIM:
        key_id = wire.CLAIM_KEY_ID
    elif ftype != wire.ERROR_DOWN and key_id == wire.CLAIM_KEY_ID:
        key_id = 1
    return wire.Key(device_id, key_id, secret)


def breaks_the_claim_key_rule(ftype, key_id, downlink):
    """docs/protocol.md, check 5: BAD_KEY_ID."""
    if key_id == wire.CLAIM_KEY_ID:
        return ftype != (wire.ERROR_DOWN if downlink else wire.CLAIM)
    return ftype == wire.CLAIM


class Case:
    """One generated frame, with what decoding it should give back."""

    def __init__(self, ftype, key, boot, counter, fields, frame):
        self.type, self.key, self.boot, self.counter = ftype, key, boot, counter
        self.fields, self.frame = fields, frame
        self.downlink = bool(ftype & wire.DOWNLINK_BIT)

    def guard(self):
        """A receiver's guard for which this frame is fresh."""
        if self.downlink:
            guard = wire.DownlinkGuard(self.boot)
            guard.last_sent = self.counter // wire.DOWNLINK_ANSWERS
            return guard
        return wire.ReplayGuard()

    def decode(self, frame=None, lookup=None, guard=None):
        return wire.decode(
            self.frame if frame is None else frame,
            lookup or wire.lookup_for(self.key),
            guard if guard is not None else self.guard(),
            self.downlink,
        )

    def refusal(self, frame=None, lookup=None, guard=None):
        """The reason name decode() refuses with; any other exception fails the test."""
        try:
            self.decode(frame, lookup, guard)
        except wire.FrameError as e:
            return e.name
        return "ACCEPTED"


@st.composite
def cases(draw, types=tuple(FIELDS)):
    ftype = draw(st.sampled_from(types))
    key = key_for(ftype, *draw(key_parts))
    boot = draw(u32s)
    counter = draw(downlink_counters if ftype & wire.DOWNLINK_BIT else uplink_counters)
    fields = draw(FIELDS[ftype])
    try:
        frame = encode(ftype, key, boot, counter, fields)
    except wire.FrameError as e:
        # Only "too big for one frame" is acceptable: an offer says so as BAD_PAYLOAD.
        assert e.reason == (wire.BAD_PAYLOAD if ftype == wire.OTA_OFFER else wire.BAD_LENGTH), e
        assume(False)
    return Case(ftype, key, boot, counter, fields, frame)


def golden_cases():
    out = []
    for c in GOLDEN:
        k = c["key"]
        key = wire.Key(bytes.fromhex(k["device_id"]), k["key_id"], bytes.fromhex(k["secret"]))
        ftype = {v: n for n, v in wire.TYPE_NAMES.items()}[c["type"]]
        out.append(
            Case(
                ftype,
                key,
                c["header"]["boot"],
                c["header"]["counter"],
                c["fields"],
                bytes.fromhex(c["hex"]),
            )
        )
    return out


def documented_flip_reason(case, flipped, byte_index):
    """The reason docs/protocol.md ("Order of checks") gives for a flip in byte byte_index."""
    if byte_index == 0:
        return "BAD_VERSION"
    if byte_index == 1:
        accepted = wire.DOWNLINK_TYPES if case.downlink else wire.UPLINK_TYPES
        if flipped[1] not in accepted:
            return "BAD_TYPE"
        if breaks_the_claim_key_rule(flipped[1], case.key.key_id, case.downlink):
            return "BAD_KEY_ID"
        return "BAD_MAC"
    if byte_index in (2, 3):
        return "BAD_LENGTH"
    if 4 <= byte_index < 12:
        return "UNKNOWN_DEVICE"
    if byte_index in (12, 13):
        key_id = int.from_bytes(flipped[12:14], "big")
        if breaks_the_claim_key_rule(flipped[1], key_id, case.downlink):
            return "BAD_KEY_ID"
        return "UNKNOWN_KEY"
    return "BAD_MAC"  # boot, counter, payload, MAC: the MAC is checked before the replay window


def flip(frame, bit):
    out = bytearray(frame)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def as_fields(case, m):
    got = {name: getattr(m, name) for name in case.fields}
    for name in ("readings", "sensors", "failures"):
        if got.get(name) is not None:
            got[name] = [tuple(item) for item in got[name]]
    return got


# ---- Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ftype", list(FIELDS), ids=wire.type_name)
@FAST
@given(data=st.data())
def test_every_frame_type_decodes_to_what_was_encoded(ftype, data):
    case = data.draw(cases(types=(ftype,)))
    m = case.decode()
    assert m.type == ftype
    assert (m.device_id, m.key_id, m.boot, m.counter) == (
        case.key.device_id,
        case.key.key_id,
        case.boot,
        case.counter,
    )
    want = dict(case.fields)
    if "sensors" in want:
        want["sensors"] = [tuple(s) for s in want["sensors"]]
    assert as_fields(case, m) == want
    assert wire.frame_length(case.frame[: wire.HEADER_SIZE]) == len(case.frame) <= wire.MAX_FRAME


# ---- Refusals ------------------------------------------------------------------------------------


@FAST
@given(case=cases())
def test_every_truncation_is_refused_as_bad_length(case):
    for cut in range(len(case.frame)):
        assert case.refusal(case.frame[:cut]) == "BAD_LENGTH", cut


@FAST
@given(case=cases(), extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_after_a_frame_are_refused_as_bad_length(case, extra):
    assert case.refusal(case.frame + extra) == "BAD_LENGTH"


@FAST
@given(case=cases(), data=st.data())
def test_single_bit_flip_is_refused_with_the_documented_reason(case, data):
    bit = data.draw(st.integers(0, len(case.frame) * 8 - 1))
    flipped = flip(case.frame, bit)
    assert case.refusal(flipped) == documented_flip_reason(case, flipped, bit // 8)


@pytest.mark.parametrize("case", golden_cases(), ids=[c["name"] for c in GOLDEN])
def test_every_bit_flip_of_a_golden_frame_is_refused_with_the_documented_reason(case):
    for bit in range(len(case.frame) * 8):
        flipped = flip(case.frame, bit)
        assert case.refusal(flipped) == documented_flip_reason(case, flipped, bit // 8), bit


@FAST
@given(case=cases(), tag=st.binary(min_size=wire.MAC_SIZE, max_size=wire.MAC_SIZE))
def test_forged_mac_is_refused(case, tag):
    assume(tag != case.frame[-wire.MAC_SIZE :])
    assert case.refusal(case.frame[: -wire.MAC_SIZE] + tag) == "BAD_MAC"


@FAST
@given(case=cases(), secret=st.binary(min_size=16, max_size=64))
def test_frame_under_another_secret_is_refused(case, secret):
    impostor = wire.Key(case.key.device_id, case.key.key_id, secret)
    lookup = wire.lookup_for(impostor)
    assume(impostor.signer.mac(b"probe") != case.key.signer.mac(b"probe"))
    assert case.refusal(lookup=lookup) == "BAD_MAC"


@FAST
@given(case=cases(types=wire.UPLINK_TYPES), data=st.data())
def test_replayed_uplink_counters_are_refused(case, data):
    guard = wire.ReplayGuard()
    case.decode(guard=guard)
    assert case.refusal(guard=guard) == "REPLAY"
    older = data.draw(st.integers(0, case.counter))
    again = encode_like(case, case.boot, older) if older else None
    if again is not None:
        assert case.refusal(again, guard=guard) == "REPLAY"
    if case.boot:
        earlier_boot = data.draw(st.integers(0, case.boot - 1))
        stale = encode_like(case, earlier_boot, data.draw(uplink_counters))
        assert case.refusal(stale, guard=guard) == "STALE_BOOT"
    newer = (
        encode_like(case, case.boot, case.counter + 1)
        if case.counter < wire.MAX_UPLINK_COUNTER
        else None
    )
    if newer is not None:
        assert case.decode(newer, guard=guard).counter == case.counter + 1


@FAST
@given(case=cases(types=wire.DOWNLINK_TYPES), data=st.data())
def test_replayed_downlink_counters_are_refused(case, data):
    guard = case.guard()
    case.decode(guard=guard)
    assert case.refusal(guard=guard) == "REPLAY"
    older = data.draw(st.integers(wire.DOWNLINK_ANSWERS, case.counter))
    assert case.refusal(encode_like(case, case.boot, older), guard=guard) == "REPLAY"
    other_boot = data.draw(u32s.filter(lambda b: b != case.boot))
    assert (
        case.refusal(encode_like(case, other_boot, case.counter), guard=case.guard())
        == "STALE_BOOT"
    )


def encode_like(case, boot, counter):
    return encode(case.type, case.key, boot, counter, case.fields)


@FAST
@given(case=cases(), other=st.binary(min_size=8, max_size=8), key_id=st.integers(0, 0xFFFF))
def test_unknown_device_or_key_is_refused(case, other, key_id):
    def only_other_device(device_id, k):
        return case.key if device_id == other else None

    assume(other != case.key.device_id)
    assert case.refusal(lookup=only_other_device) == "UNKNOWN_DEVICE"

    def other_key_id(device_id, k):
        return case.key if k == key_id else wire.UNKNOWN_KEY

    assume(key_id != case.key.key_id)
    assert case.refusal(lookup=other_key_id) == "UNKNOWN_KEY"


@FAST
@given(case=cases())
def test_frame_for_the_other_direction_is_refused_as_bad_type(case):
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(case.frame, wire.lookup_for(case.key), case.guard(), not case.downlink)
    assert refused.value.reason == wire.BAD_TYPE


# ---- Nothing but FrameError escapes ------------------------------------------------------

KEY = wire.Key(bytes(8), 0, bytes(32))


@FAST
@given(junk=st.binary(max_size=wire.MAX_FRAME + 10), downlink=st.booleans())
def test_random_bytes_only_ever_raise_frame_error(junk, downlink):
    guard = wire.DownlinkGuard(0) if downlink else wire.ReplayGuard()
    with pytest.raises(wire.FrameError):
        wire.decode(junk, lambda d, k: KEY, guard, downlink)
    if len(junk) >= wire.HEADER_SIZE:
        try:
            wire.frame_length(junk[: wire.HEADER_SIZE])
        except wire.FrameError:
            pass


@FAST
@given(
    ftype=st.sampled_from(wire.UPLINK_TYPES + wire.DOWNLINK_TYPES),
    payload=st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: b"\x00" + b),
)
def test_authentic_frames_with_arbitrary_payloads_decode_or_are_bad_payload(ftype, payload):
    # A correctly signed frame from a buggy sender: the parsers meet every byte sequence.
    length = wire.MIN_FRAME + len(payload)
    key = key_for(ftype, KEY.device_id, KEY.key_id, bytes(32))  # KEY's secret
    head = bytes([wire.VERSION, ftype]) + length.to_bytes(2, "big") + key.device_id
    head += key.key_id.to_bytes(2, "big") + (7).to_bytes(4, "big") + (16).to_bytes(4, "big")
    frame = head + payload + key.signer.mac(head + payload)
    downlink = bool(ftype & wire.DOWNLINK_BIT)
    guard = wire.DownlinkGuard(7) if downlink else wire.ReplayGuard()
    if downlink:
        guard.next_counter()  # the node sent uplink 1, which downlink counter 16 answers
    try:
        m = wire.decode(frame, wire.lookup_for(key), guard, downlink)
    except wire.FrameError as e:
        assert e.reason == wire.BAD_PAYLOAD, e
    else:
        assert m.type == ftype


@FAST
@given(case=cases(), data=st.data())
def test_authentic_frames_with_mutated_payloads_decode_or_are_bad_payload(case, data):
    body = bytearray(case.frame[wire.HEADER_SIZE : -wire.MAC_SIZE])
    assume(body)
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    body = bytes(body[:cut])
    length = wire.MIN_FRAME + len(body)
    head = bytearray(case.frame[: wire.HEADER_SIZE])
    head[2:4] = length.to_bytes(2, "big")
    frame = bytes(head) + body + case.key.signer.mac(bytes(head) + body)
    try:
        m = case.decode(frame)
    except wire.FrameError as e:
        assert e.reason == wire.BAD_PAYLOAD, e
    else:
        assert m.type == case.type
