# Runs under the micropython binary (also valid CPython): every golden frame in the vectors
# file must encode to its exact bytes, decode back to its inputs, and be refused when
# replayed, truncated, forged, of another version or direction, or from an unknown device/key.
# Usage: micropython check_vectors.py <wire_v1.json>   (wire.py on MICROPYPATH)
# Last line on success: "VECTORS PASSED <cases> <checks>"; exit status 1 on any failure.
import json
import sys
from binascii import hexlify, unhexlify

import wire

failures = []
checks = [0]


def check(name, what, ok, detail=""):
    checks[0] += 1
    if ok:
        print("ok", name, what)
    else:
        failures.append(name + " " + what)
        print("FAIL", name, what, detail)


DOWNLINK = ("ACK", "ERROR_DOWN", "CONFIG", "IDENTITY", "OTA_OFFER", "OTA_CHUNK")


def key_of(case):
    k = case["key"]
    return wire.Key(unhexlify(k["device_id"]), k["key_id"], unhexlify(k["secret"]))


def encode(case, key):
    h = case["header"]
    t = case["type"]
    if "payload" in case:  # a malformed payload, signed: what no encoder makes
        code = [c for c in wire.TYPE_NAMES if wire.TYPE_NAMES[c] == t][0]
        return wire._frame(code, key, h["boot"], h["counter"], unhexlify(case["payload"]))
    f = case["fields"]
    if t == "HELLO":
        sensors = [tuple(s) for s in f["sensors"]]
        return wire.encode_hello(
            key, h["boot"], h["counter"], f["fw_version"], f["reset_cause"], f["drops"], sensors,
            f.get("failures"), f.get("free_flash"),
        )
    if t == "READINGS":
        # The node's path: ReadingsWriter into a pre-sized buffer.
        w = wire.ReadingsWriter(key)
        w.begin(f["readings_boot"], f["first_seq"], f["base_ms"], f["unsynced"], f["pre_sync"])
        for r in f["readings"]:
            if not w.add(r[0], r[1], r[2]):
                raise ValueError("reading did not fit")
        return bytes(w.finish(h["boot"], h["counter"]))
    if t == "ACK":
        return wire.encode_ack(
            key, h["boot"], h["counter"], f["readings_boot"], f["through_seq"], f["gateway_time_ms"]
        )
    if t == "ERROR_DOWN" or t == "ERROR_UP":
        return wire.encode_error(
            key,
            h["boot"],
            h["counter"],
            f["reason"],
            f["ref"],
            f["detail"],
            t == "ERROR_DOWN",
        )
    if t == "CONFIG":
        return wire.encode_config(key, h["boot"], h["counter"], f["settings"])
    if t == "CLAIM":
        return wire.encode_claim(key, h["boot"], h["counter"], unhexlify(f["nonce"]),
                                 f["fw_version"])
    if t == "IDENTITY":
        return wire.encode_identity(key, h["boot"], h["counter"])
    if t == "OTA_OFFER":
        files = [(p[0], p[1], unhexlify(p[2])) for p in f["files"]]
        return wire.encode_ota_offer(key, h["boot"], h["counter"], f["ref"], f["kind"],
                                     f["version"], files)
    if t == "OTA_CHUNK_REQUEST":
        return wire.encode_ota_chunk_request(key, h["boot"], h["counter"], f["ref"],
                                             f["file_index"], f["offset"], f["length"])
    if t == "OTA_CHUNK":
        return wire.encode_ota_chunk(key, h["boot"], h["counter"], f["ref"], f["file_index"],
                                     f["offset"], unhexlify(f["data"]))
    if t == "OTA_RESULT":
        return wire.encode_ota_result(key, h["boot"], h["counter"], f["ref"], f["state"],
                                      f["bytes_done"], f["reason"])
    raise ValueError("unknown type " + t)


def decoded_fields(case, m):
    t = case["type"]
    if t == "HELLO":
        got = {
            "fw_version": m.fw_version,
            "reset_cause": m.reset_cause,
            "drops": list(m.drops),
            "sensors": [list(s) for s in m.sensors],
            "failures": None if m.failures is None else [list(p) for p in m.failures],
        }
        # The cases from before the free flash section do not name it (they decode with None).
        if "free_flash" in case["fields"]:
            got["free_flash"] = m.free_flash
        return got
    if t == "READINGS":
        return {
            "readings_boot": m.readings_boot,
            "first_seq": m.first_seq,
            "base_ms": m.base_ms,
            "unsynced": m.unsynced,
            "pre_sync": m.pre_sync,
            "readings": [list(r) for r in m.readings],
        }
    if t == "ACK":
        return {
            "readings_boot": m.readings_boot,
            "through_seq": m.through_seq,
            "gateway_time_ms": m.gateway_time_ms,
        }
    if t == "ERROR_DOWN" or t == "ERROR_UP":
        return {"reason": m.reason, "ref": m.ref, "detail": m.detail}
    if t == "CLAIM":
        return {"nonce": hexlify(m.nonce).decode(), "fw_version": m.fw_version}
    if t == "IDENTITY":
        return {}
    if t == "OTA_OFFER":
        files = [[p[0], p[1], hexlify(p[2]).decode()] for p in m.files]
        return {"ref": m.ref, "kind": m.kind, "version": m.version, "files": files}
    if t == "OTA_CHUNK_REQUEST":
        return {"ref": m.ref, "file_index": m.file_index, "offset": m.offset,
                "length": m.length}
    if t == "OTA_CHUNK":
        return {"ref": m.ref, "file_index": m.file_index, "offset": m.offset,
                "data": hexlify(m.data).decode()}
    if t == "OTA_RESULT":
        return {"ref": m.ref, "state": m.state, "bytes_done": m.bytes_done, "reason": m.reason}
    return {"settings": m.settings}


def sent_downlink(case):
    """The direction the frame travels: its type's, unless a refusal sends it the wrong way."""
    if "sent" in case:
        return case["sent"] == "downlink"
    return case["type"] in DOWNLINK


def new_guard(case):
    h = case["header"]
    if case["type"] in DOWNLINK:
        g = wire.DownlinkGuard(h["boot"])
        g.last_sent = h["counter"] // wire.DOWNLINK_ANSWERS  # the uplink it answers was sent
        return g
    return wire.ReplayGuard()


def refused(frame, lookup, guard, downlink):
    try:
        wire.decode(frame, lookup, guard, downlink)
    except wire.FrameError as e:
        return e.name
    except Exception as e:
        return "ESCAPED " + repr(e)
    return "ACCEPTED"


def run_case(case):
    name = case["name"]
    key = key_of(case)
    lookup = wire.lookup_for(key)
    downlink = case["type"] in DOWNLINK
    if "claim" in case:
        c = case["claim"]
        derived = wire.claim_secret(unhexlify(c["claim_key"]), key.device_id, unhexlify(c["nonce"]))
        check(name, "claim secret derives", hexlify(derived).decode() == case["key"]["secret"])
    frame = encode(case, key)
    got = hexlify(frame).decode()
    check(name, "encodes to the golden bytes", got == case["hex"], got)
    check(
        name,
        "frame_length reads the header",
        wire.frame_length(frame[: wire.HEADER_SIZE]) == len(frame),
    )

    golden = unhexlify(case["hex"])
    guard = new_guard(case)
    m = wire.decode(golden, lookup, guard, downlink)
    check(name, "decodes to its type", wire.type_name(m.type) == case["type"], m.type)
    h = case["header"]
    header = [m.device_id, m.key_id, m.boot, m.counter]
    want = [key.device_id, key.key_id, h["boot"], h["counter"]]
    check(name, "decodes its header", header == want, repr(header))
    got_fields = decoded_fields(case, m)
    check(name, "decodes to its inputs", got_fields == case["fields"], repr(got_fields))

    r = refused(golden, lookup, guard, downlink)
    check(name, "replay refused", r == "REPLAY", r)
    forged = bytearray(golden)
    forged[-1] ^= 0x01
    r = refused(bytes(forged), lookup, new_guard(case), downlink)
    check(name, "bad MAC refused", r == "BAD_MAC", r)
    payload_flip = bytearray(golden)
    payload_flip[wire.HEADER_SIZE] ^= 0x80
    r = refused(bytes(payload_flip), lookup, new_guard(case), downlink)
    check(name, "payload bit flip refused", r == "BAD_MAC", r)
    r = refused(golden[:-1], lookup, new_guard(case), downlink)
    check(name, "truncated by one byte refused", r == "BAD_LENGTH", r)
    r = refused(golden[:10], lookup, new_guard(case), downlink)
    check(name, "truncated inside the header refused", r == "BAD_LENGTH", r)
    v2 = bytearray(golden)
    v2[0] = 2
    r = refused(bytes(v2), lookup, new_guard(case), downlink)
    check(name, "unknown version refused", r == "BAD_VERSION", r)
    r = refused(golden, lookup, new_guard(case), not downlink)
    check(name, "wrong direction refused", r == "BAD_TYPE", r)
    r = refused(golden, lambda d, k: None, new_guard(case), downlink)
    check(name, "unknown device refused", r == "UNKNOWN_DEVICE", r)
    r = refused(golden, lambda d, k: wire.UNKNOWN_KEY, new_guard(case), downlink)
    check(name, "unknown key refused", r == "UNKNOWN_KEY", r)


def run_refusal(case):
    name = case["name"]
    key = key_of(case)
    frame = encode(case, key)
    check(name, "encodes to the golden bytes", hexlify(frame).decode() == case["hex"])
    r = refused(unhexlify(case["hex"]), wire.lookup_for(key), new_guard(case),
                sent_downlink(case))
    check(name, "refused as " + case["refused"], r == case["refused"], r)


def main():
    with open(sys.argv[1]) as f:
        vectors = json.load(f)
    cases = vectors["cases"]
    for case in cases:
        try:
            run_case(case)
        except Exception as e:
            check(case["name"], "runs without an exception", False, repr(e))
    for case in vectors["refusals"]:
        try:
            run_refusal(case)
        except Exception as e:
            check(case["name"], "runs without an exception", False, repr(e))
    if failures:
        print("VECTORS FAILED", len(failures), "of", checks[0])
        sys.exit(1)
    print("VECTORS PASSED", len(cases), checks[0])


main()
