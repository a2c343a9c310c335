"""Over-the-air updates on the node (docs/ota.md, "The node's part"): the real firmware on
emulated boards, driven by a scripted gateway that speaks the wire with kinhbac.wire. It
offers releases, serves chunks, and, playing the attacker, forges, replays and tampers with
frames. Readings are checked by (boot, seq) across every update: nothing is lost."""

import json
import re
import threading
import time

import pytest
from test_firmware import FAST, assert_contiguous, seqs_of, wait_until

from kinhbac import wire
from kinhbac.emulator import launcher, otadata
from kinhbac.emulator.board import HARD_RESET, PWRON_RESET
from kinhbac.emulator.interpreter import CODE_RATIO
from kinhbac.emulator.receiver import Receiver
from kinhbac.broker import LocalBroker
from kinhbac.firmware import FIRMWARE_DIR, bundle_files, compile_mpy, config_file
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
        # frames an attacker on the link adds after the next ACK: (key, boot, counter of that
        # ACK) -> bytes
        self.inject: list = []
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
        frames, self.inject = self.inject, []
        return frame + b"".join(make(key, boot, counter) for make in frames)


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto, as tests/test_gateway_ota.py runs it (the collector's too)."""
    with LocalBroker(tmp_path / "broker", persistence=True) as b:
        yield b


@pytest.fixture
def fleet(tmp_path, monkeypatch, broker):
    from helpers.fleet import running_fleet
    from test_gateway_ota import ADMIN

    with running_fleet(tmp_path / "fleet", broker.port, monkeypatch, ADMIN) as server:
        yield server


@pytest.fixture
def gateways():
    started = []
    yield started
    for process in started:
        process.stop()


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


def heap_reports(text):
    """The live heap after a collection, as the node reports it each second (log_level 3)."""
    return [int(n) for n in re.findall(r"heap alloc=(\d+) free=", text)]


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
    time.sleep(3)  # heap reports (one a second, after a collection) of the idle node
    gateway.offer(node, bundle_files())
    gateway.drop_connections()  # the next session's HELLO gets the offer
    gateway.result(node, "downloading")
    idle = heap_reports(node.board.console.text())
    during = gateway.count(node.device)
    gateway.result(node, "rebooting", timeout=180)
    assert gateway.count(node.device) > during  # readings went on during the download
    download = heap_reports(node.board.console.text())[len(idle):]
    grew = max(download) - max(idle)
    print(f"\nlive heap on the unix port: idle {max(idle)} B, downloading {max(download)} B "
          f"(+{grew} B)")
    # docs/ota.md: under 16 KB above idle on an ESP32. What a download adds is code (ota.py,
    # trial.py) and small objects (the offer's file list), which take 1.43x (code) and 2.0x
    # (objects) here what they take there; no large buffer (a chunk lands in the frame
    # buffer, hashing reads into it), so the code ratio, the smaller, bounds it.
    assert grew < 16 * 1024 * CODE_RATIO
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


# ----- releases that never confirm are rolled back -----

BROKEN_AT_IMPORT = patched("app", 'VERSION = "0.1.0"',
                           'raise RuntimeError("this release is broken")\nVERSION = "0.1.0"')


def test_a_bundle_that_raises_at_import_is_rolled_back_after_three_trial_boots(
        emulator, gateway):
    node = start(emulator, gateway)
    gateway.offer(node, bundle_files() | BROKEN_AT_IMPORT)
    gateway.drop_connections()
    _, _, _, reason = gateway.result(node, "rolled_back", timeout=180)
    assert reason == "import failed: RuntimeError: this release is broken"
    assert list(dict.fromkeys(gateway.states(node))) == [
        "downloading", "verifying", "installed", "rebooting", "rolled_back"]
    # The old version runs again, and its readings flow.
    wait_until(lambda: gateway.devices[node.device].hello.fw_version == OLD_VERSION,
               what="the old version in HELLO")
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    text = node.board.console.text()
    assert text.count("\nRuntimeError: this release is broken") == 3  # three trial boots
    assert "release 0.2.0 rolled back: import failed" in text
    assert len(node.board.boots) == 5  # the switch, three trial boots, the old app again
    node.board.power_cut(restore=False)
    app = board_json(node, "/app.json")
    assert app["slot"] == "" and not app.get("trial")
    assert app["rolled_back"] == {"ref": REF, "version": NEW_VERSION, "told": True,
                                  "reason": reason}
    assert_nothing_lost(gateway, node)


NO_BME280 = patched("sensors", "chip = chips[address] = BME280(i2c, address)",
                    "chip = chips[address] = BME280(i2c, address - 1)")  # a wrong address
NO_GATEWAY = patched("link", "stream = await self.gateway.connect(node.wdt)",
                     'raise OSError(113, "this release reaches no gateway")')


@pytest.mark.parametrize("broken, why", [
    (NO_BME280, "sensor errors"),
    (NO_GATEWAY, "no ACK from the gateway"),
])
def test_a_bundle_that_cannot_read_its_sensors_or_reach_its_gateway_is_rolled_back(
        emulator, gateway, broken, why):
    # Sampling every 100 ms: three trials and their outage pile up readings on flash, and at
    # FAST's 20 ms (250 readings a second) their count, not the update, would test the heap.
    node = start(emulator, gateway, ota_trial_s=10, interval_ms=100)
    gateway.offer(node, bundle_files() | broken)
    gateway.drop_connections()
    gateway.result(node, "rebooting", timeout=180)
    _, _, _, reason = gateway.result(node, "rolled_back", timeout=120)
    assert reason == f"trial not confirmed within 10 s: {why}"
    assert "confirmed" not in gateway.states(node)
    wait_until(lambda: gateway.devices[node.device].hello.fw_version == OLD_VERSION,
               what="the old version in HELLO")
    count = gateway.count(node.device)
    gateway.wait_for_count(count + 50, node.device)  # every sensor of the kit reads again
    latest = gateway.readings_of(node.device)[-25:]
    assert {r.sensor for r in latest} == set(range(len(launcher.SENSOR_KIT)))
    assert node.board.console.text().count(f"not confirmed within 10 s ({why})") == 3
    node.board.power_cut(restore=False)
    assert_nothing_lost(gateway, node)


# ----- from the attacker's side -----


def test_a_forged_offer_is_refused_and_nothing_is_staged(emulator, gateway):
    node = start(emulator, gateway)
    files = bundle_files()
    offered = [(p, len(d), __import__("hashlib").sha256(d).digest()) for p, d in files.items()]
    forger = wire.Key(node.key.device_id, node.key.key_id, b"\x01" * 32)  # not the node's key
    gateway.inject.append(lambda key, boot, counter: wire.encode_ota_offer(
        forger, boot, counter + 1, REF, wire.OTA_BUNDLE, NEW_VERSION, offered))
    gateway.drop_connections()
    node.board.console.wait_for("BAD_MAC", timeout=30)
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    assert gateway.results.get(node.device) is None  # the node never answered it
    node.board.power_cut(restore=False)
    assert board_json(node, "/ota.json") is None and board_json(node, "/app.json") is None
    assert node.board.read_file("/a/lib/node/app.mpy") is None
    assert_nothing_lost(gateway, node)


def test_a_replayed_offer_is_refused_after_the_gateway_withdrew_it(emulator, gateway):
    node = start(emulator, gateway)
    gateway.unsupported = True  # the rollout is paused: requests are refused
    gateway.offer(node, bundle_files())
    gateway.drop_connections()
    node.board.console.wait_for("update refused by the gateway: no release offered", timeout=30)
    node.board.console.wait_for("download stopped")
    sessions = node.board.console.text().count("I kinhbac: session ")
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    # The refusal kept the session: readings went on in it.
    assert node.board.console.text().count("I kinhbac: session ") == sessions
    recorded = gateway.sent_offers[-1]
    del gateway.assignments[node.device]
    answered = gateway.states(node)  # each real offer's answer (a session may have restarted)
    gateway.inject.append(lambda key, boot, counter: recorded)  # the recorded frame, again
    gateway.drop_connections()
    node.board.console.wait_for("REPLAY", timeout=30)
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    assert gateway.states(node) == answered  # the replay got no answer
    assert set(answered) == {"downloading"}
    node.board.power_cut(restore=False)
    assert board_json(node, "/ota.json") is None  # what was staged went with the refusal
    assert node.board.read_file("/a/lib/wire.mpy") is None
    assert_nothing_lost(gateway, node)


def small_first(files):
    """The bundle with its smallest file first: it is the first one asked for."""
    first = min(files, key=lambda p: len(files[p]))
    return {first: files[first]} | files


def test_a_chunk_with_wrong_bytes_is_asked_again_and_the_release_still_installs(
        emulator, gateway):
    node = start(emulator, gateway)
    files = small_first(bundle_files())
    tampered = []

    def tamper(device, msg, data):
        if not tampered and msg.file_index == 0:
            tampered.append(msg.offset)
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return [(msg.ref, msg.file_index, msg.offset, data)]

    gateway.tamper = tamper
    gateway.offer(node, files)
    gateway.drop_connections()
    gateway.result(node, "confirmed", timeout=240)
    text = node.board.console.text()
    assert "SHA-256 mismatch (1)" in text and "SHA-256 mismatch (2)" not in text
    asked = [(i, off) for _, i, off, _ in gateway.requests[node.device]]
    assert asked.count((0, 0)) == 2  # the file from its start again
    node.board.power_cut(restore=False)
    for path, data in files.items():
        assert node.board.read_file("/a" + path) == data


def test_a_file_that_keeps_arriving_wrong_fails_the_release_and_nothing_is_installed(
        emulator, gateway):
    node = start(emulator, gateway)
    files = small_first(bundle_files())

    def tamper(device, msg, data):
        return [(msg.ref, msg.file_index, msg.offset, bytes(len(data)))]  # zeros

    gateway.tamper = tamper
    gateway.offer(node, files)
    gateway.drop_connections()
    _, _, _, reason = gateway.result(node, "failed", timeout=60)
    first = next(iter(files))
    assert reason == f"{first}: SHA-256 mismatch 3 times"
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    assert gateway.devices[node.device].hello.fw_version == OLD_VERSION
    # Offered again at the next session, the node answers its final state, downloads nothing.
    asked = len(gateway.requests[node.device])
    gateway.results[node.device].clear()
    gateway.drop_connections()
    gateway.result(node, "failed")
    assert len(gateway.requests[node.device]) == asked
    node.board.power_cut(restore=False)
    assert board_json(node, "/app.json") is None
    assert node.board.read_file("/a" + first) is None
    assert_nothing_lost(gateway, node)


def test_chunks_nobody_asked_for_are_ignored_counted_and_never_written(emulator, gateway):
    node = start(emulator, gateway)
    files = bundle_files()
    sent = []

    def tamper(device, msg, data):
        if sent:
            return [(msg.ref, msg.file_index, msg.offset, data)]
        sent.append(msg)
        junk = b"\xAA" * len(data)
        return [(msg.ref, msg.file_index, msg.offset + 1, junk),  # another offset
                (msg.ref + 1, msg.file_index, msg.offset, junk),  # another release
                (msg.ref, msg.file_index + 1, msg.offset, junk),  # another file
                (msg.ref, msg.file_index, msg.offset, data)]  # the one asked for

    gateway.tamper = tamper
    gateway.offer(node, files)
    gateway.drop_connections()
    gateway.result(node, "confirmed", timeout=240)
    text = node.board.console.text()
    assert "; 3 ignored" in text and "; 4 ignored" not in text
    assert "SHA-256 mismatch" not in text  # the junk never reached a file
    node.board.power_cut(restore=False)
    for path, data in files.items():
        assert node.board.read_file("/a" + path) == data


def test_offers_the_node_cannot_take_fail_with_the_reason_and_write_nothing(emulator, gateway):
    node = start(emulator, gateway)
    main_py = node.board  # noqa: F841 (read after power-off below)
    cases = [
        ({"/main.py": b"print('taken over')"}, "path /main.py is not a file under /lib"),
        ({"/boot.py": b"import os"}, "path /boot.py is not a file under /lib"),
        ({"/lib/../main.py": b"x"}, "path /lib/../main.py is not a file under /lib"),
        ({"/config.json": b"{}"}, "path /config.json is not a file under /lib"),
        ({"/lib/wire.mpy": b"x"}, "a bundle without /lib/node/app.mpy would not start"),
        ({"/lib/node/app.mpy": b"x", "/lib/big.bin": bytes(1_200_000)}, "needs 1204224 bytes of flash"),
    ]
    for n, (files, words) in enumerate(cases):
        ref = REF + 100 + n
        gateway.offer(node, files, ref=ref)
        gateway.drop_connections()
        _, _, _, reason = gateway.result(node, "failed", ref=ref)
        assert reason.startswith(words), reason
        assert gateway.states(node, ref) == ["failed"]
    assert node.device not in gateway.requests  # not a byte asked for
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    node.board.power_cut(restore=False)
    assert node.board.read_file("/main.py") == (FIRMWARE_DIR / "main.py").read_bytes()
    assert board_json(node, "/app.json") is None
    assert node.board.read_file("/a/main.py") is None
    assert_nothing_lost(gateway, node)


# ----- power cuts -----


def test_a_power_cut_mid_download_resumes_from_what_is_on_flash(emulator, gateway):
    node = start(emulator, gateway)
    files = bundle_files()
    gateway.offer(node, files)
    gateway.drop_connections()
    wait_until(lambda: len(gateway.requests.get(node.device, [])) >= 30, timeout=60,
               what="30 chunks asked for")
    node.board.power_cut()
    before = list(gateway.requests[node.device])
    _, _, size, _ = gateway.result(node, "confirmed", timeout=240)
    downloading = [done for r, s, done, _ in gateway.results[node.device] if s == "downloading"]
    assert downloading[0] == 0 and downloading[-1] > 0  # the second offer found bytes there
    after = gateway.requests[node.device][len(before):]
    # Nothing asked again but, at most, the chunk the cut interrupted.
    assert len(set(before) & set(after)) <= 1
    assert sum(n for _, _, _, n in before) + sum(n for _, _, _, n in after) <= size + 1024
    node.board.power_cut(restore=False)
    for path, data in files.items():
        assert node.board.read_file("/a" + path) == data
    assert_nothing_lost(gateway, node)


def test_a_power_cut_before_the_switch_keeps_the_staged_files_and_switches_later(
        emulator, gateway):
    node = start(emulator, gateway)
    files = bundle_files()

    def cut(device, state):
        if state == "verifying" and gateway.on_result is not None:
            gateway.on_result = None
            node.board.power_cut(restore=False)  # while the node checks every file

    gateway.on_result = cut
    gateway.offer(node, files)
    gateway.drop_connections()
    gateway.result(node, "verifying", timeout=180)
    wait_until(lambda: not node.board.running, what="the power off")
    assert board_json(node, "/app.json") is None  # not switched yet
    asked = len(gateway.requests[node.device])
    node.board.power_on()
    gateway.result(node, "confirmed", timeout=120)
    assert len(gateway.requests[node.device]) == asked  # every byte was still there
    total = sum(len(d) for d in files.values())
    assert [d for _, s, d, _ in gateway.results[node.device] if s == "downloading"][-1] == total
    assert_nothing_lost(gateway, node)


def test_a_power_cut_in_the_first_trial_boot_is_a_trial_boot_and_it_confirms_after(
        emulator, gateway):
    node = start(emulator, gateway)
    gateway.offer(node, bundle_files())
    gateway.drop_connections()
    gateway.result(node, "rebooting", timeout=180)
    node.board.console.wait_for(f"firmware {NEW_VERSION}", timeout=30)
    node.board.power_cut()  # before it could confirm, most likely; counted either way
    gateway.result(node, "confirmed", timeout=60)
    wait_until(lambda: gateway.devices[node.device].hello.fw_version == NEW_VERSION,
               what="the new version in HELLO")
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    node.board.power_cut(restore=False)
    app = board_json(node, "/app.json")
    assert app["slot"] == "a" and app["trial"] is False and app["boots"] == 0
    assert_nothing_lost(gateway, node)


# ----- with the real fleet and gateway -----


def test_the_fleet_and_gateway_update_an_emulated_node_which_confirms(
        tmp_path, emulator, broker, collector, fleet, gateways):
    from test_gateway_ota import FleetProxy, OtaSite, ref_of, start_gateway

    site = OtaSite(fleet)
    proxy = FleetProxy(fleet)
    try:
        gw = start_gateway(tmp_path, broker, proxy, site, gateways)
        node = launcher.provision(emulator, gw.port, **FAST)
        mac = ":".join(f"{b:02x}" for b in node.board.mac)
        device = fleet.call("POST", "/api/devices", site.technician, 201,
                            json={"mac": mac, "site_id": site.site_id})
        node.key = wire.Key(bytes.fromhex(device["wire_id"]), device["key_id"],
                            bytes.fromhex(device["secret"]))
        node.secret = bytes.fromhex(device["secret"])
        node.board.write_files(config_file(launcher.node_config(node, gw.port, emulator, **FAST)))
        release = site.upload(NEW_VERSION, bundle_files())
        site.rollout(release, [node.key])
        node.board.power_on()
        steps = ["offered", "downloading", "verifying", "installed", "rebooting", "confirmed"]

        def states():
            with collector.lock:
                return [p["state"] for p in collector.ota_progress if p["device"] == node.device]

        wait_until(lambda: "confirmed" in states(), timeout=240,
                   what=f"the update confirmed (have {states()})")
        assert list(dict.fromkeys(states())) == steps
        node.board.power_cut(restore=False)
        app = board_json(node, "/app.json")
        assert app["version"] == NEW_VERSION and app["ref"] == ref_of(release)
        assert app["trial"] is False
    finally:
        proxy.close()


# ----- image releases: the OTA partition -----


def image_release(size=48 * 1024):
    from kinhbac.emulator.esp32_image import app_image

    return {"image.bin": app_image(NEW_VERSION, size=size, seed=7)}


def test_an_image_is_written_to_the_update_partition_and_kept_once_confirmed(
        emulator, gateway):
    node = start(emulator, gateway)
    files = image_release()
    image = files["image.bin"]
    gateway.offer(node, files, kind=wire.OTA_IMAGE)
    gateway.drop_connections()
    gateway.result(node, "confirmed", timeout=180)
    assert list(dict.fromkeys(gateway.states(node))) == [
        "downloading", "verifying", "installed", "rebooting", "confirmed"]
    wait_until(lambda: gateway.devices[node.device].hello.fw_version == NEW_VERSION,
               what="the new version in HELLO")
    # Every request stayed within one 4 KiB block: the node writes chunks straight to flash.
    assert all(off // 4096 == (off + n - 1) // 4096
               for _, _, off, n in gateway.requests[node.device])
    assert node.board.running_app.label == "ota_1"
    assert node.board.app_valid_calls == [1]  # at the confirmation, in the trial boot
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    node.board.power_cut(restore=False)
    ota_1 = node.board.flash.partition("ota_1")
    assert node.board.flash.read(ota_1.offset, len(image)) == image
    assert otadata.active_entry(node.board.flash).state == otadata.VALID
    assert board_json(node, "/app.json")["trial"] is False
    assert_nothing_lost(gateway, node)


def test_an_image_that_never_confirms_is_rolled_back_by_the_bootloader_and_reported(
        emulator, gateway):
    node = start(emulator, gateway, ota_trial_s=10, interval_ms=100)
    gateway.offer(node, image_release(), kind=wire.OTA_IMAGE)
    gateway.drop_connections()
    gateway.result(node, "rebooting", timeout=180)
    gateway.accepting = False  # the new image never reaches its gateway
    node.board.console.wait_for("not confirmed within 10 s", timeout=60)
    gateway.accepting = True
    _, _, _, reason = gateway.result(node, "rolled_back", timeout=60)
    assert reason == "the bootloader rolled the image back: reset before it confirmed"
    wait_until(lambda: gateway.devices[node.device].hello.fw_version == OLD_VERSION,
               what="the old version in HELLO")
    assert node.board.running_app.label == "ota_0"
    assert node.board.app_valid_calls == []
    gateway.wait_for_count(gateway.count(node.device) + 50, node.device)
    node.board.power_cut(restore=False)
    assert_nothing_lost(gateway, node)
