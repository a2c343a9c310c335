"""Over-the-air updates on the node (docs/ota.md, "The node's part"): the real firmware on
emulated boards, driven by a scripted gateway that speaks the wire with kinhbac.wire. It
offers releases, serves chunks, and, playing the attacker, forges, replays and tampers with
frames. Readings are checked by (boot, seq) across every update: nothing is lost."""

import json
import threading
import time

import pytest
from test_firmware import FAST, assert_contiguous, seqs_of, wait_until

from kinhbac import wire
from kinhbac.emulator import launcher
from kinhbac.emulator.board import HARD_RESET, PWRON_RESET
from kinhbac.emulator.receiver import Receiver
from kinhbac.firmware import FIRMWARE_DIR, bundle_files, compile_mpy
from kinhbac.firmware import firmware_version

OLD_VERSION = firmware_version()
NEW_VERSION = "0.2.0"
REF = 0x5EED0001
STATES = wire.OTA_STATE_NAMES


def release(files, kind=wire.OTA_BUNDLE):
    return {"kind": kind, "files": dict(files)}


def patched(module, old, new):
    """The bundle's /lib/node/<module>.mpy compiled from the firmware's source with one change."""
    source = (FIRMWARE_DIR / "node" / f"{module}.py").read_text()
    assert source.count(old) == 1, f"{old!r} not once in node/{module}.py"
    path = f"/lib/node/{module}.py"
    return {path[:-3] + ".mpy": compile_mpy(source.replace(old, new).encode(), path)}


class OtaGateway(Receiver):
    """The test receiver, plus a gateway's OTA serving as docs/ota.md "How the parts talk" says:
    after a HELLO's ACK one OTA_OFFER while the device has an assignment, each
    OTA_CHUNK_REQUEST answered with its bytes, each OTA_RESULT recorded. Hooks let a test
    tamper with what it sends, as an attacker on the link would."""

    def __init__(self) -> None:
        super().__init__({})
        self.assignments: dict[str, tuple[int, str, dict]] = {}  # device -> (ref, version, rel)
        self.results: dict[str, list[tuple[int, str, int, str]]] = {}
        self.requests: dict[str, list[tuple[int, int, int, int]]] = {}
        self.sent_offers: list[bytes] = []
        self.tamper = None  # (device, msg, data) -> list of (ref, index, offset, data) to send
        self.unsupported = False  # answer chunk requests with ERROR UNSUPPORTED
        self.on_result = None  # (device, state name) -> None, called on the receiver's thread
        self.inject: list[bytes] = []  # raw frames written after the next HELLO's answers
        self._cv = threading.Condition()

    def offer(self, node, files, version=NEW_VERSION, ref=REF, kind=wire.OTA_BUNDLE):
        self.assignments[node.device] = (ref, version, release(files, kind))

    def states(self, node, ref=REF):
        return self.states_of(node.device, ref)

    def states_of(self, device, ref):
        return [s for r, s, _, _ in self.results.get(device, []) if r == ref]

    def result(self, node, state, ref=REF, timeout=60.0):
        wait_until(lambda: state in self.states(node, ref), timeout=timeout,
                   what=f"OTA_RESULT {state} (have {self.states(node, ref)})")
        return next(x for x in self.results[node.device] if x[0] == ref and x[1] == state)

    def _handle(self, msg):
        device = wire.device_hex(msg.device_id)
        if msg.type == wire.OTA_RESULT:
            with self._lock:
                self.results.setdefault(device, []).append(
                    (msg.ref, STATES.get(msg.state, str(msg.state)), msg.bytes_done, msg.reason))
            if self.on_result is not None:
                self.on_result(device, STATES.get(msg.state))
            return []
        if msg.type == wire.OTA_CHUNK_REQUEST:
            with self._lock:
                self.requests.setdefault(device, []).append(
                    (msg.ref, msg.file_index, msg.offset, msg.length))
            if self.unsupported or device not in self.assignments:
                return [("error", (msg.counter, "no release offered"))]
            ref, _, rel = self.assignments[device]
            data = list(rel["files"].values())[msg.file_index][msg.offset:msg.offset + msg.length]
            if self.tamper is not None:
                return [("chunk", c) for c in self.tamper(device, msg, data)]
            return [("chunk", (msg.ref, msg.file_index, msg.offset, data))]
        replies = super()._handle(msg)
        final = {"confirmed", "failed", "rolled_back"}
        if msg.type == wire.HELLO and device in self.assignments and not final & set(
                self.states_of(device, self.assignments[device][0])):
            ref, version, rel = self.assignments[device]
            files = [(p, len(d), __import__("hashlib").sha256(d).digest())
                     for p, d in rel["files"].items()]
            replies.append(("offer", (ref, rel["kind"], version, files)))
        return replies

    def _encode(self, kind, key, boot, counter, payload):
        if kind == "offer":
            frame = wire.encode_ota_offer(key, boot, counter, *payload)
            self.sent_offers.append(frame)
            return frame
        if kind == "chunk":
            return wire.encode_ota_chunk(key, boot, counter, *payload)
        if kind == "error":
            ref, detail = payload
            return wire.encode_error(key, boot, counter, wire.UNSUPPORTED, ref, detail)
        frame = Receiver._encode(kind, key, boot, counter, payload)
        return frame + b"".join(self._take_injected())

    def _take_injected(self):
        frames, self.inject = self.inject, []
        return frames


@pytest.fixture
def gateway():
    with OtaGateway() as gw:
        gw.nodes = []
        yield gw
        for node in gw.nodes:  # shown when the test fails
            print(f"----- console of {node.board.name} -----")
            lines = [x for x in node.board.console.text().splitlines()
                     if "took seq" not in x and "saved through" not in x]
            print("\n".join(lines[-300:]))


def start(emulator, gateway, **overrides):
    settings = FAST | {"log_level": 3} | overrides
    node = launcher.provision(emulator, gateway.port, **settings)
    gateway.keys[node.key.device_id] = node.key
    gateway.nodes.append(node)
    node.board.power_on()
    gateway.wait_for_count(2 * len(launcher.SENSOR_KIT), node.device)
    return node


def board_json(node, path):
    data = node.board.read_file(path)
    return None if data is None else json.loads(data)


def assert_nothing_lost(gateway, node):
    """Every boot's readings arrived from seq 1 on, in order. Those in flight when the board
    reset are sent again (their ACK never came), as after any reset: the gateway keeps one."""
    assert gateway.devices[node.device].order_violations == 0
    for boot in sorted({r.boot for r in gateway.readings_of(node.device)}):
        assert_contiguous(seqs_of(gateway, node, boot))


# ----- the good path -----


def test_a_bundle_is_downloaded_switched_to_and_confirmed_while_readings_flow(
        emulator, gateway):
    node = start(emulator, gateway)
    gateway.offer(node, bundle_files())
    gateway.drop_connections()  # the next session's HELLO gets the offer
    gateway.result(node, "downloading")
    during = gateway.count(node.device)
    gateway.result(node, "rebooting", timeout=180)
    assert gateway.count(node.device) > during  # readings went on during the download
    _, _, size, _ = gateway.result(node, "confirmed", timeout=60)
    assert size == sum(len(d) for d in bundle_files().values())
    wait_until(lambda: gateway.devices[node.device].hello.fw_version == NEW_VERSION,
               what="the new version in HELLO")
    # Each step once, in order (a final state is repeated to an offer that crossed it).
    assert list(dict.fromkeys(gateway.states(node))) == [
        "downloading", "verifying", "installed", "rebooting", "confirmed"]
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    assert node.board.boots == [PWRON_RESET, HARD_RESET]  # the switch's machine.reset()
    node.board.power_cut(restore=False)
    app = board_json(node, "/app.json")
    assert app["slot"] == "a" and app["trial"] is False and app["version"] == NEW_VERSION
    assert board_json(node, "/ota.json") is None
    for path, data in bundle_files().items():
        assert node.board.read_file("/a" + path) == data
    assert_nothing_lost(gateway, node)
    assert {r.boot for r in gateway.readings_of(node.device)} == {1, 2}
