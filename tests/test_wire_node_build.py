"""The wire codec as a node carries it (kinhbac/firmware.py's node_wire_source): kinhbac/wire.py
without its gateway-only parts. It must still speak every frame a node speaks, byte for byte,
and reach nothing that was left out."""

import ast
import builtins
import dis
import types
from pathlib import Path

import pytest
from test_wire_vectors import CASES, DOWNLINK, encode, fields_of, guard_for

from kinhbac import wire
from kinhbac.firmware import GATEWAY_ONLY_BEGIN, GATEWAY_ONLY_END, firmware_files, node_wire_source

ROOT = Path(__file__).resolve().parents[1]
# The uplink frames a node sends (READINGS through ReadingsWriter, tested below).
NODE_SENDS = {"HELLO", "ERROR_UP", "CLAIM", "OTA_CHUNK_REQUEST", "OTA_RESULT"}


def load(source: str) -> types.ModuleType:
    module = types.ModuleType("wire")
    exec(compile(source, "wire.py", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def node_wire():
    return load(node_wire_source())


def node_key(node_wire, case):
    k = case["key"]
    return node_wire.Key(bytes.fromhex(k["device_id"]), k["key_id"], bytes.fromhex(k["secret"]))


def global_names(code) -> set[str]:
    """The globals a code object and the functions and classes inside it read."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names


def test_the_node_build_reaches_no_name_it_left_out(node_wire):
    source = node_wire_source()
    used = global_names(compile(source, "wire.py", "exec"))
    missing = {n for n in used if n not in vars(node_wire) and not hasattr(builtins, n)}
    # micropython.const is imported on a board; CPython takes the fallback defined in the file.
    assert missing == set(), f"the node's wire.py reads names it no longer defines: {missing}"


def test_every_wire_name_the_firmware_uses_is_in_the_node_build(node_wire):
    used = set()
    for path in (ROOT / "firmware").rglob("*.py"):
        used |= {n.attr for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id == "wire"}
    assert used, "no wire names found in firmware/: the pattern is wrong"
    missing = sorted(n for n in used if not hasattr(node_wire, n))
    assert missing == [], f"firmware/ uses wire names the node's build leaves out: {missing}"


def test_the_node_build_leaves_out_the_gateway_parts_and_keeps_every_line_number(node_wire):
    source = Path(wire.__file__).read_text()
    built = node_wire_source()
    assert built.count("\n") == source.count("\n")  # a board's traceback names wire.py's line
    for name in ("encode_ack", "encode_config", "encode_identity", "encode_ota_offer",
                 "encode_ota_chunk", "encode_readings", "downlink_counter", "ReplayGuard",
                 "HelloMessage", "ReadingsMessage", "OTA_STATE_NAMES"):
        assert hasattr(wire, name) and not hasattr(node_wire, name), name
    assert set(node_wire._PARSERS) == {
        code for code, name in wire.TYPE_NAMES.items() if name in DOWNLINK}
    assert firmware_files(compiled=False)["/lib/wire.py"] == built.encode()


@pytest.mark.parametrize("case", [c for c in CASES if c["type"] in DOWNLINK],
                         ids=lambda c: c["name"])
def test_the_node_build_decodes_every_downlink_vector(node_wire, case):
    key = node_key(node_wire, case)
    guard = node_wire.DownlinkGuard(case["header"]["boot"])
    guard.last_sent = guard_for(case).last_sent
    m = node_wire.decode(bytes.fromhex(case["hex"]), node_wire.lookup_for(key), guard, True)
    assert fields_of(case, m) == case["fields"]


@pytest.mark.parametrize("case", [c for c in CASES if c["type"] in NODE_SENDS],
                         ids=lambda c: c["name"])
def test_the_node_build_encodes_every_frame_a_node_sends_to_its_golden_bytes(
        node_wire, case, monkeypatch):
    # encode() of the vectors' tests calls wire.<encoder>: pointed at the node's build here.
    import test_wire_vectors

    monkeypatch.setattr(test_wire_vectors, "wire", node_wire)
    assert encode(case, node_key(node_wire, case)).hex() == case["hex"]


@pytest.mark.parametrize("case", [c for c in CASES if c["type"] == "READINGS"],
                         ids=lambda c: c["name"])
def test_the_node_build_writes_the_golden_readings_bytes(node_wire, case):
    f, h = case["fields"], case["header"]
    writer = node_wire.ReadingsWriter(node_key(node_wire, case))
    writer.begin(f["readings_boot"], f["first_seq"], f["base_ms"], f["unsynced"], f["pre_sync"])
    assert all(writer.add(*r) for r in f["readings"])
    assert bytes(writer.finish(h["boot"], h["counter"])).hex() == case["hex"]


@pytest.mark.parametrize("broken, problem", [
    (f"a = 1\n{GATEWAY_ONLY_BEGIN}\nb = 2\n", "never closed"),
    (f"a = 1\n{GATEWAY_ONLY_END}\n", "closed, never opened"),
    (f"{GATEWAY_ONLY_BEGIN}\n{GATEWAY_ONLY_BEGIN}\n{GATEWAY_ONLY_END}\n", "opened twice"),
])
def test_unbalanced_markers_are_refused_naming_the_problem(broken, problem):
    with pytest.raises(ValueError, match=problem):
        node_wire_source(broken)
