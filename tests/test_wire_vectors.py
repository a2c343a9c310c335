"""Golden frames: CPython and the real MicroPython binary produce and accept exactly these bytes."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.micropython import find_mpy_cross, run_micropython

from kinhbac import wire

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
SCRIPTS = ROOT / "tests" / "micropython"
CASES = json.loads((VECTORS / "wire_v1.json").read_text(encoding="utf-8"))["cases"]
REFUSALS = json.loads((VECTORS / "wire_v1.json").read_text(encoding="utf-8"))["refusals"]
DOWNLINK = {"ACK", "ERROR_DOWN", "CONFIG", "IDENTITY", "OTA_OFFER", "OTA_CHUNK"}


def key_of(case):
    k = case["key"]
    return wire.Key(bytes.fromhex(k["device_id"]), k["key_id"], bytes.fromhex(k["secret"]))


def encode(case, key):
    h, t = case["header"], case["type"]
    boot, counter = h["boot"], h["counter"]
    if "payload" in case:  # a malformed payload, signed: what no encoder makes
        code = next(c for c, name in wire.TYPE_NAMES.items() if name == t)
        return wire._frame(code, key, boot, counter, bytes.fromhex(case["payload"]))
    f = case["fields"]
    if t == "HELLO":
        sensors = [tuple(s) for s in f["sensors"]]
        return wire.encode_hello(
            key, boot, counter, f["fw_version"], f["reset_cause"], f["drops"], sensors,
            f.get("failures"), f.get("free_flash"),
        )
    if t == "READINGS":
        readings = [tuple(r) for r in f["readings"]]
        return wire.encode_readings(
            key,
            boot,
            counter,
            f["readings_boot"],
            f["first_seq"],
            f["base_ms"],
            f["unsynced"],
            readings,
            f["pre_sync"],
        )
    if t == "ACK":
        return wire.encode_ack(
            key, boot, counter, f["readings_boot"], f["through_seq"], f["gateway_time_ms"]
        )
    if t in ("ERROR_DOWN", "ERROR_UP"):
        return wire.encode_error(
            key, boot, counter, f["reason"], f["ref"], f["detail"], t == "ERROR_DOWN"
        )
    if t == "CLAIM":
        return wire.encode_claim(key, boot, counter, bytes.fromhex(f["nonce"]), f["fw_version"])
    if t == "IDENTITY":
        return wire.encode_identity(key, boot, counter)
    if t == "OTA_OFFER":
        files = [(path, size, bytes.fromhex(digest)) for path, size, digest in f["files"]]
        return wire.encode_ota_offer(key, boot, counter, f["ref"], f["kind"], f["version"], files)
    if t == "OTA_CHUNK_REQUEST":
        return wire.encode_ota_chunk_request(key, boot, counter, f["ref"], f["file_index"],
                                             f["offset"], f["length"])
    if t == "OTA_CHUNK":
        return wire.encode_ota_chunk(key, boot, counter, f["ref"], f["file_index"], f["offset"],
                                     bytes.fromhex(f["data"]))
    if t == "OTA_RESULT":
        return wire.encode_ota_result(key, boot, counter, f["ref"], f["state"], f["bytes_done"],
                                      f["reason"])
    assert t == "CONFIG"
    return wire.encode_config(key, boot, counter, f["settings"])


def fields_of(case, m):
    names = list(case["fields"])
    got = {name: getattr(m, name) for name in names}
    for name in ("readings", "sensors", "failures"):
        if got.get(name) is not None:
            got[name] = [list(item) for item in got[name]]
    if "nonce" in got:
        got["nonce"] = got["nonce"].hex()
    if "files" in got:
        got["files"] = [[path, size, digest.hex()] for path, size, digest in got["files"]]
    if "data" in got:
        got["data"] = bytes(got["data"]).hex()
    return got


def guard_for(case):
    if case["type"] in DOWNLINK:
        guard = wire.DownlinkGuard(case["header"]["boot"])
        guard.last_sent = case["header"]["counter"] // wire.DOWNLINK_ANSWERS
        return guard
    return wire.ReplayGuard()


def test_vectors_cover_every_frame_type_and_the_largest_frame():
    types = {c["type"] for c in CASES}
    assert types == set(wire.TYPE_NAMES.values())
    assert max(c["length"] for c in CASES) == wire.MAX_FRAME


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cpython_encodes_each_vector_to_its_golden_bytes(case):
    frame = encode(case, key_of(case))
    assert frame.hex() == case["hex"]
    assert len(frame) == case["length"]


@pytest.mark.parametrize(
    "case", [c for c in CASES if c["type"] == "READINGS"], ids=lambda c: c["name"]
)
def test_node_writer_produces_the_golden_readings_bytes(case):
    f, h = case["fields"], case["header"]
    writer = wire.ReadingsWriter(key_of(case))
    writer.begin(f["readings_boot"], f["first_seq"], f["base_ms"], f["unsynced"], f["pre_sync"])
    assert all(writer.add(*r) for r in f["readings"])
    assert bytes(writer.finish(h["boot"], h["counter"])).hex() == case["hex"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cpython_decodes_each_golden_frame_to_its_inputs(case):
    key = key_of(case)
    m = wire.decode(
        bytes.fromhex(case["hex"]), wire.lookup_for(key), guard_for(case), case["type"] in DOWNLINK
    )
    assert m.type_name == case["type"]
    assert (m.device_id, m.key_id, m.boot, m.counter) == (
        key.device_id,
        key.key_id,
        case["header"]["boot"],
        case["header"]["counter"],
    )
    assert fields_of(case, m) == case["fields"]


# ---- Under the real micropython binary ----------------------------------------------------------


@pytest.fixture
def node_lib(tmp_path):
    """A folder holding wire.py alone, as /lib on a node: MICROPYPATH for the scripts."""
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(ROOT / "kinhbac" / "wire.py", lib / "wire.py")
    return lib


def run_script(name, *args, lib):
    done = run_micropython(SCRIPTS / name, *args, cwd=lib.parent, env={"MICROPYPATH": str(lib)})
    report = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    return done, (lines[-1] if lines else ""), report


def expected_vector_checks():
    # check_vectors.py runs 14 checks per case, one more where a claim secret derives, and 2
    # per refusal.
    return 14 * len(CASES) + sum(1 for c in CASES if "claim" in c) + 2 * len(REFUSALS)


@pytest.mark.parametrize("case", [c for c in CASES if "claim" in c], ids=lambda c: c["name"])
def test_claim_secret_derives_the_vectors_key(case):
    claim = case["claim"]
    derived = wire.claim_secret(bytes.fromhex(claim["claim_key"]), key_of(case).device_id,
                                bytes.fromhex(claim["nonce"]))
    assert derived.hex() == case["key"]["secret"]


def test_claim_frames_refuse_the_wrong_key_ids():
    device = bytes.fromhex("6b62000102030405")
    claim_key = wire.Key(device, wire.CLAIM_KEY_ID, b"c" * 32)
    with pytest.raises(wire.FrameError, match="CLAIM is signed under key id 65535"):
        wire.encode_claim(wire.Key(device, 1, b"c" * 32), 1, 1, bytes(16), "0.1.0")
    with pytest.raises(wire.FrameError, match="nonce must be 16 bytes"):
        wire.encode_claim(claim_key, 1, 1, bytes(15), "0.1.0")
    with pytest.raises(wire.FrameError, match="signed with the device's own key"):
        wire.encode_identity(claim_key, 1, 16)
    # An IDENTITY under the claim key id, however it was signed, is refused before its MAC.
    forged = wire._frame(wire.IDENTITY, claim_key, 1, 16, b"")
    guard = wire.DownlinkGuard(1)
    guard.last_sent = 1
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(forged, wire.lookup_for(claim_key), guard, True)
    assert refused.value.name == "BAD_KEY_ID"


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c["name"])
def test_refusal_vectors_encode_to_their_bytes_and_are_refused_for_their_reason(case):
    key = key_of(case)
    assert encode(case, key).hex() == case["hex"]
    downlink = case.get("sent", "downlink" if case["type"] in DOWNLINK else "uplink")
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(bytes.fromhex(case["hex"]), wire.lookup_for(key), guard_for(case),
                    downlink == "downlink")
    assert refused.value.name == case["refused"]


def test_the_claim_key_id_signs_claims_only_and_a_claim_needs_it():
    device = bytes.fromhex("6b62000102030405")
    claim_key = wire.Key(device, wire.CLAIM_KEY_ID, b"c" * 32)
    own_key = wire.Key(device, 1, b"d" * 32)
    uplink = [wire.encode_hello(claim_key, 1, 1, "0.1.0", 1, [], []),
              wire.encode_error(claim_key, 1, 2, wire.BUSY, 0, "", False)]
    for frame in uplink:
        with pytest.raises(wire.FrameError) as refused:
            wire.decode(frame, wire.lookup_for(claim_key), wire.ReplayGuard())
        assert refused.value.name == "BAD_KEY_ID"
    claim_signed_by_own_key = wire._frame(wire.CLAIM, own_key, 1, 3, bytes(16) + b"\x050.1.0")
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(claim_signed_by_own_key, wire.lookup_for(own_key), wire.ReplayGuard())
    assert refused.value.name == "BAD_KEY_ID"
    # Downlink, the claim key signs the gateway's ERROR answer to a CLAIM, and nothing else.
    guard = wire.DownlinkGuard(1)
    guard.last_sent = 5
    answer = wire.encode_error(claim_key, 1, 16, wire.CLAIM_PENDING, 1, "", True)
    assert wire.decode(answer, wire.lookup_for(claim_key), guard, True).reason == \
        wire.CLAIM_PENDING
    ack = wire.encode_ack(claim_key, 1, 32)
    with pytest.raises(wire.FrameError) as refused:
        wire.decode(ack, wire.lookup_for(claim_key), guard, True)
    assert refused.value.name == "BAD_KEY_ID"


def test_micropython_encodes_decodes_and_refuses_every_vector(node_lib):
    done, last, report = run_script("check_vectors.py", VECTORS / "wire_v1.json", lib=node_lib)
    assert done.returncode == 0, report
    assert last == f"VECTORS PASSED {len(CASES)} {expected_vector_checks()}", report
    assert "FAIL" not in done.stdout, report
    for refusal in ("replay refused", "bad MAC refused", "truncated by one byte refused"):
        assert done.stdout.count(refusal) == len(CASES), report


def test_micropython_runs_the_vectors_from_a_precompiled_mpy(node_lib, tmp_path):
    compiled = subprocess.run(
        [find_mpy_cross(), "-o", str(node_lib / "wire.mpy"), str(node_lib / "wire.py")],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr
    (node_lib / "wire.py").unlink()
    done, last, report = run_script("check_vectors.py", VECTORS / "wire_v1.json", lib=node_lib)
    assert (
        done.returncode == 0 and last == f"VECTORS PASSED {len(CASES)} {expected_vector_checks()}"
    ), report


def test_micropython_hmac_matches_rfc4231(node_lib):
    done, last, report = run_script("check_hmac.py", VECTORS / "rfc4231.json", lib=node_lib)
    assert done.returncode == 0 and last == "HMAC PASSED 7", report


def test_micropython_fills_a_readings_batch_without_allocating(node_lib):
    done, last, report = run_script("check_no_alloc.py", lib=node_lib)
    assert done.returncode == 0 and last == f"NO ALLOC PASSED {wire.MAX_READINGS}", report
