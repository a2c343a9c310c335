"""The gateway's side of over-the-air updates, end to end (docs/ota.md, "The gateway's part"): the
fleet service (releases uploaded and rollouts started through its API, as an admin would), a
gateway process fetching from it, a private Mosquitto, and nodes played by this test speaking
the wire with their own keys, so that a test can also ask what a real node never would.

Between the gateway and the fleet sits FleetProxy, a man in the middle on this machine: it
forwards every request, counts them (a release is fetched once per site), and for the attacks
changes what the fleet answered (a flipped byte, a foreign signature, another release's signed
manifest) or cuts a download, as a compromised network or store would."""

import base64
import hashlib
import http.client
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.fleet import FleetServer, running_fleet, wait_until
from helpers.gateway import GatewayProcess, read_downlink_frame
from helpers.ota import ADMIN, REFRESH_S, SITE, enrol_site

from kinhbac import wire
from kinhbac.broker import LocalBroker
from kinhbac.emulator import launcher

CACHED = 'kinhbac_gateway_ota_releases_total{outcome="cached"}'
REFUSED = 'kinhbac_gateway_ota_releases_total{outcome="refused"}'
UNSUPPORTED = 'kinhbac_gateway_frames_refused_total{reason="unsupported"}'


# ----- the fleet, as an admin and a technician set it up -----


class OtaSite:
    """A site with one enrolled gateway, its devices, releases and rollouts, through the API."""

    def __init__(self, fleet: FleetServer) -> None:
        self.fleet = fleet
        self.admin, self.site_id, self.gateway_token, self.technician = enrol_site(fleet)
        self._macs = 0

    def register(self, n: int) -> list[wire.Key]:
        keys = []
        for _ in range(n):
            self._macs += 1
            mac = f"02:00:00:00:{self._macs >> 8:02x}:{self._macs & 0xFF:02x}"
            device = self.fleet.call("POST", "/api/devices", self.technician, 201,
                                     json={"mac": mac, "site_id": self.site_id})
            keys.append(wire.Key(bytes.fromhex(device["wire_id"]), device["key_id"],
                                 bytes.fromhex(device["secret"])))
        return keys

    def upload(self, version: str, files: dict[str, bytes], kind: str = "bundle") -> dict:
        answer = self.fleet.http.post(
            "/api/releases", headers={"Authorization": f"Bearer {self.admin}"},
            data={"kind": kind, "version": version},
            files=[("file", (path, data)) for path, data in files.items()])
        assert answer.status_code == 201, answer.text
        return answer.json()

    def rollout(self, release: dict, keys: list[wire.Key]) -> str:
        """A rollout of `release` to these devices, all in its first wave."""
        return self.fleet.call("POST", "/api/rollouts", self.admin, 201, json={
            "release_id": release["id"], "waves": [100],
            "target": {"devices": [k.device_id.hex() for k in keys]}})["id"]

    def cancel(self, rollout_id: str) -> None:
        self.fleet.call("POST", f"/api/rollouts/{rollout_id}/cancel", self.admin)


def manifest_sha256(release: dict) -> str:
    return hashlib.sha256(release["manifest"].encode()).hexdigest()


def ref_of(release: dict) -> int:
    return int.from_bytes(bytes.fromhex(manifest_sha256(release))[:4], "big")


def bundle(size: int, files: int = 2) -> dict[str, bytes]:
    """Random files, `size` bytes together."""
    each = size // files
    return {f"/lib/node/part{i}.mpy": os.urandom(each + (size - each * files if i == 0 else 0))
            for i in range(files)}


# ----- the man in the middle -----


class FleetProxy:
    """Plain HTTP on this machine in front of the fleet: forwards each GET, records it
    (path, Range), and lets a test rewrite an answer or cut one short."""

    def __init__(self, fleet: FleetServer) -> None:
        self.fleet = fleet
        self.requests: list[tuple[str, str | None, int]] = []  # path, Range, status sent
        self.rewrite: Callable[[str, bytes], bytes] | None = None
        self.cut: dict[str, int] = {}  # path -> bytes sent before the connection breaks, once
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy._forward(self)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.fleet.port, timeout=10)
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() in ("authorization", "range", "accept")}
        upstream.request("GET", handler.path, headers=headers)
        answer = upstream.getresponse()
        body = answer.read()
        upstream.close()
        if self.rewrite is not None and answer.status in (200, 206):
            body = self.rewrite(handler.path, body)
        with self.lock:
            self.requests.append((handler.path, handler.headers.get("Range"), answer.status))
            cut = self.cut.pop(handler.path, None)
        handler.send_response(answer.status)
        for name in ("Content-Type", "Content-Range", "Cache-Control", "Retry-After"):
            if answer.getheader(name):
                handler.send_header(name, answer.getheader(name))
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body if cut is None else body[:cut])
        handler.wfile.flush()
        if cut is not None:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _, _ in self.requests if p == path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----- a node, played by the test -----


class Node:
    """A node's side of the wire for one boot: its counters (a real DownlinkGuard, so the
    gateway's answers are checked as the firmware checks them) and its readings' seqs."""

    def __init__(self, key: wire.Key, port: int, boot: int = 1) -> None:
        self.key, self.port, self.boot = key, port, boot
        self.guard = wire.DownlinkGuard(boot)
        self.seq = 0
        self.sock: socket.socket | None = None

    @property
    def device(self) -> str:
        return self.key.device_id.hex()

    def connect(self) -> "Node":
        self.close()
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, frame: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(frame)

    def read(self) -> wire.Message:
        assert self.sock is not None
        return read_downlink_frame(self.sock, self.key, self.guard)

    def readings_frame(self, n: int = 1) -> bytes:
        first, self.seq = self.seq + 1, self.seq + n
        return wire.encode_readings(self.key, self.boot, self.guard.next_counter(), self.boot,
                                    first, 1_800_000_000_000, False,
                                    [(0, 10 * i, 20.0 + i) for i in range(n)])

    def readings(self, n: int = 1) -> list[wire.Message]:
        """Send readings; the gateway's answers up to their ACK (what came before it too)."""
        self.send(self.readings_frame(n))
        return self._until_ack(self.seq)

    def _until_ack(self, seq: int) -> list[wire.Message]:
        got = []
        while True:
            msg = self.read()
            got.append(msg)
            if msg.type == wire.ACK and msg.through_seq == seq:
                return got

    def hello(self) -> list[wire.Message]:
        """A new session: HELLO, and the gateway's answers to it (ACK, then an offer if one
        is due), told apart from later ones by a reading sent right after it."""
        self.connect()
        self.send(wire.encode_hello(self.key, self.boot, self.guard.next_counter(), "0.1.0",
                                    wire.RESET_POWER_ON, [0] * 7, [["t", "C"]]))
        answers = self.readings()
        assert answers[-1].type == wire.ACK
        return answers[:-1]

    def offer(self) -> wire.Message | None:
        answers = self.hello()
        assert answers[0].type == wire.ACK and answers[0].through_seq is None
        offers = [a for a in answers if a.type == wire.OTA_OFFER]
        assert len(answers) == 1 + len(offers) and len(offers) <= 1, answers
        return offers[0] if offers else None

    def request(self, ref: int, index: int, offset: int, length: int = wire.OTA_MAX_CHUNK
                ) -> wire.Message:
        self.send(wire.encode_ota_chunk_request(self.key, self.boot, self.guard.next_counter(),
                                                ref, index, offset, length))
        return self.read()

    def raw_request(self, payload: bytes) -> wire.Message:
        """A chunk request the codec would not encode (authentic, with a fresh counter)."""
        self.send(wire._frame(wire.OTA_CHUNK_REQUEST, self.key, self.boot,
                              self.guard.next_counter(), payload))
        return self.read()

    def download(self, offer: wire.Message) -> dict[str, bytes]:
        """Every file of the offer, chunk by chunk as the firmware asks, checked against it."""
        files = {}
        for index, (path, size, digest) in enumerate(offer.files):
            data = bytearray()
            while len(data) < size:
                chunk = self.request(offer.ref, index, len(data))
                assert chunk.type == wire.OTA_CHUNK, getattr(chunk, "detail", chunk)
                assert (chunk.ref, chunk.file_index, chunk.offset) == (offer.ref, index,
                                                                      len(data))
                data += chunk.data
            assert hashlib.sha256(data).digest() == digest
            files[path] = bytes(data)
        return files

    def result(self, ref: int, state: int, done: int = 0, reason: str = "") -> None:
        """OTA_RESULT: never answered (a reading after it shows nothing came before its ACK)."""
        self.send(wire.encode_ota_result(self.key, self.boot, self.guard.next_counter(), ref,
                                         state, done, reason))
        assert len(self.readings()) == 1


# ----- fixtures -----


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto that keeps sessions across a restart (the collector's too)."""
    with LocalBroker(tmp_path / "broker", persistence=True) as b:
        yield b


@pytest.fixture
def fleet(tmp_path, monkeypatch, broker):
    with running_fleet(tmp_path / "fleet", broker.port, monkeypatch, ADMIN) as server:
        yield server


@pytest.fixture
def site(fleet):
    return OtaSite(fleet)


@pytest.fixture
def proxy(fleet):
    p = FleetProxy(fleet)
    yield p
    p.close()


@pytest.fixture
def gateways():
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


def start_gateway(tmp_path: Path, broker, proxy: FleetProxy, site: OtaSite, gateways: list,
                  **settings) -> GatewayProcess:
    gateway = GatewayProcess(tmp_path / "gw", key_file=None, broker_port=broker.port,
                             fleet_url=proxy.url, fleet_token=site.gateway_token,
                             key_refresh_s=REFRESH_S, **settings)
    gateways.append(gateway)
    return gateway.start()


def metric(gateway: GatewayProcess, name: str) -> float:
    return gateway.metrics().get(name, 0)


def progress(collector, device: str) -> list[tuple[str, int, str]]:
    with collector.lock:
        return [(p["state"], p["bytes"], p["reason"]) for p in collector.ota_progress
                if p["device"] == device]


def cache_folders(gateway: GatewayProcess) -> list[str]:
    releases = gateway.workdir / "data" / "ota-cache" / "releases"
    return sorted(p.name for p in releases.iterdir()) if releases.exists() else []


# ----- the tests -----


def test_a_release_is_fetched_once_for_the_site_and_each_node_downloads_and_reports_it(
        tmp_path, broker, collector, site, proxy, gateways):
    keys = site.register(3)
    files = bundle(5000)
    release = site.upload("0.2.0", files)
    rollout_id = site.rollout(release, keys)
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")

    for key in keys:
        node = Node(key, gateway.port)
        offer = node.offer()
        assert offer is not None
        # The ref is the manifest's SHA-256's first 4 bytes; the files are the manifest's.
        assert (offer.ref, offer.kind, offer.version) == (ref_of(release), wire.OTA_BUNDLE,
                                                          "0.2.0")
        assert [(p, s, d.hex()) for p, s, d in offer.files] == [
            (f["path"], f["size"], f["sha256"]) for f in release["files"]]
        node.result(offer.ref, wire.OTA_DOWNLOADING, 0)
        assert node.download(offer) == files
        for state in (wire.OTA_VERIFYING, wire.OTA_INSTALLED, wire.OTA_REBOOTING):
            node.result(offer.ref, state, 5000)
        # The new version's first boot: it confirms; no offer from then on.
        node = Node(key, gateway.port, boot=2)
        assert node.offer() is not None  # the fleet still lists it: offered until it says
        node.result(offer.ref, wire.OTA_CONFIRMED, 5000)
        assert node.offer() is None
        node.close()

    expected = [("offered", 0, ""), ("downloading", 0, ""), ("verifying", 5000, ""),
                ("installed", 5000, ""), ("rebooting", 5000, ""), ("confirmed", 5000, "")]
    for key in keys:
        collector.wait_for(lambda k=key: len(progress(collector, k.device_id.hex())) == 6,
                           what="each device's six steps")
        assert progress(collector, key.device_id.hex()) == expected
    with collector.lock:
        assert {(p["release_id"], p["rollout_id"], p["version"], p["gateway"])
                for p in collector.ota_progress} == {(release["id"], rollout_id, "0.2.0", "gw1")}
    # Once per site: one manifest and one download of each file, for three nodes, however
    # many listings (the assignments are fetched after each one).
    wait_until(lambda: proxy.count("/api/gateway/ota") >= 3, 5 * REFRESH_S, "more listings")
    assert proxy.count(f"/api/gateway/releases/{release['id']}") == 1
    for index in range(len(files)):
        assert proxy.count(f"/api/gateway/releases/{release['id']}/files/{index}") == 1
    with proxy.lock:
        paths = [p for p, _, _ in proxy.requests if p in ("/api/gateway/keys",
                                                          "/api/gateway/ota")]
    assert paths[:6] == ["/api/gateway/keys", "/api/gateway/ota"] * 3
    # Three nodes, each two files of 2,500 bytes in 1,024-byte chunks: 3 x 2 x 3.
    assert metric(gateway, "kinhbac_gateway_ota_chunks_served_total") == 18
    assert metric(gateway, UNSUPPORTED) == 0


def test_a_node_in_a_long_session_is_offered_once_after_a_readings_ack(
        tmp_path, broker, collector, site, proxy, gateways):
    # A node that stays connected says HELLO once: a release that becomes due during its
    # session follows the ACK of its next READINGS (the ACK's next answer number, which the
    # node's DownlinkGuard checks), once for the connection.
    (key,) = site.register(1)
    files = bundle(2000)
    release = site.upload("0.2.0", files)
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    node = Node(key, gateway.port)
    assert node.offer() is None  # no rollout yet
    site.rollout(release, [key])
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")
    [ack] = node.readings()  # the offer follows this ACK
    offer, ack = node.readings()
    assert (offer.type, offer.ref, ack.type) == (wire.OTA_OFFER, ref_of(release), wire.ACK)
    for _ in range(5):
        assert [a.type for a in node.readings()] == [wire.ACK]
    assert node.download(offer) == files
    node.close()
    assert node.offer().ref == offer.ref  # the next session's HELLO: offered again


def test_a_node_in_a_long_session_paused_mid_download_is_offered_again_on_resume(
        tmp_path, broker, collector, site, proxy, gateways):
    # Paused mid-download, the node's chunk requests are refused and it stops. Resumed, the
    # release is due again on the same connection: offered after a READINGS ACK, or a node
    # that stays connected would go on only at its next session (past its deadline, maybe).
    (key,) = site.register(1)
    files = bundle(2000)
    release = site.upload("0.2.0", files)
    rollout_id = site.rollout(release, [key])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")
    node = Node(key, gateway.port)
    offer = node.offer()
    assert offer is not None
    assert node.request(offer.ref, 0, 0).type == wire.OTA_CHUNK

    site.fleet.call("POST", f"/api/rollouts/{rollout_id}/pause", site.admin)
    wait_until(lambda: "OTA assignments: 0 devices" in gateway.log(), 5 * REFRESH_S,
               "the assignment withdrawn")
    assert node.request(offer.ref, 0, 1024).type == wire.ERROR_DOWN  # stopped
    assert [a.type for a in node.readings()] == [wire.ACK]  # nothing offered while paused

    site.fleet.call("POST", f"/api/rollouts/{rollout_id}/resume", site.admin)
    wait_until(lambda: gateway.log().count("OTA assignments: 1 devices") >= 2, 5 * REFRESH_S,
               "the assignment back")
    [ack] = node.readings()  # the offer follows this ACK
    again, ack = node.readings()
    assert (again.type, again.ref, ack.type) == (wire.OTA_OFFER, offer.ref, wire.ACK)
    assert node.download(again) == files
    assert [a.type for a in node.readings()] == [wire.ACK]  # once, as before the pause
    node.close()


def test_an_image_release_is_offered_as_its_one_file_and_served_whole(
        tmp_path, broker, collector, site, proxy, gateways):
    (key,) = site.register(1)
    image = bytes([0xE9]) + os.urandom(150_000)  # the app image's magic byte first
    release = site.upload("1.2.0", {"micropython.bin": image}, kind="image")
    site.rollout(release, [key])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the image cached")
    node = Node(key, gateway.port)
    offer = node.offer()
    assert (offer.kind, offer.version, offer.ref) == (wire.OTA_IMAGE, "1.2.0", ref_of(release))
    assert [(p, s) for p, s, _ in offer.files] == [("image.bin", len(image))]
    assert node.download(offer) == {"image.bin": image}
    node.close()


def test_a_node_repeating_its_results_cannot_fill_the_outbox(
        tmp_path, broker, collector, site, proxy, gateways):
    (key,) = site.register(1)
    release = site.upload("0.2.0", bundle(2000))
    site.rollout(release, [key])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")
    node = Node(key, gateway.port)
    offer = node.offer()
    node.result(offer.ref, wire.OTA_DOWNLOADING, 0)
    node.result(offer.ref, wire.OTA_DOWNLOADING, 0)  # the same again: a repeat, not recorded
    for done in range(1, 200):  # each one different
        node.result(offer.ref, wire.OTA_DOWNLOADING, done)
    node.close()
    collector.wait_for(lambda: len(progress(collector, node.device)) >= 31, what="progress")
    time.sleep(1)
    # "offered", then 30 results: the rest of the minute's are not recorded.
    assert [d for _, d, _ in progress(collector, node.device)] == [0] + list(range(30))
    assert f"node {node.device} sent more than 30 update results within a minute" \
        in gateway.log()


def test_a_node_that_never_answers_its_offers_is_offered_no_more_and_reported_failed(
        tmp_path, broker, collector, site, proxy, gateways):
    # A node whose firmware predates OTA ends its session at an offer: offered at every HELLO,
    # its readings would never get through.
    silent_key, answering_key = site.register(2)
    release = site.upload("0.2.0", bundle(2000))
    site.rollout(release, [silent_key, answering_key])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")
    silent, answering = Node(silent_key, gateway.port), Node(answering_key, gateway.port)
    for _ in range(3):
        assert silent.offer() is not None
        offer = answering.offer()
        answering.result(offer.ref, wire.OTA_DOWNLOADING, 0)  # answered: offered on
    assert silent.offer() is None
    assert answering.offer() is not None
    collector.wait_for(lambda: len(progress(collector, silent.device)) == 2, what="failed")
    [offered, (state, _, reason)] = progress(collector, silent.device)
    assert offered[0] == "offered" and state == "failed"
    assert reason == "the node left 3 offers in a row unanswered (firmware without OTA?): no " \
        "longer offered"
    assert silent.offer() is None and silent.readings(5)[-1].through_seq == silent.seq
    silent.close()
    # A node that has answered once speaks OTA: sessions that end before its answer (a node
    # short of heap while it downloads) never count against it.
    for _ in range(5):
        assert answering.offer() is not None
    answering.close()
    assert [state for state, _, _ in progress(collector, answering.device)] == [
        "offered", "downloading"]


def test_chunk_requests_for_what_the_node_was_not_offered_are_refused_and_its_session_goes_on(
        tmp_path, broker, collector, site, proxy, gateways):
    mine, other, unassigned = site.register(3)
    files = {"/lib/node/app.mpy": os.urandom(3000)}
    release = site.upload("0.2.0", files)
    other_release = site.upload("0.3.0", {"/lib/node/app.mpy": os.urandom(100)})
    rollout_id = site.rollout(release, [mine])
    site.rollout(other_release, [other])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 2, 10, "both releases cached")

    node = Node(mine, gateway.port)
    offer = node.offer()
    ref = offer.ref

    def refused(answer: wire.Message, detail: str) -> None:
        assert (answer.type, answer.reason_name, answer.detail) == (
            wire.ERROR_DOWN, "UNSUPPORTED", detail)
        assert answer.ref == node.guard.last_sent  # names the request it refuses

    other_ref = ref_of(other_release)
    refused(node.request(other_ref, 0, 0), f"release ref {other_ref:08x} is not offered to "
            "this node")  # another node's release
    refused(node.request(0xDEADBEEF, 0, 0), "release ref deadbeef is not offered to this node")
    refused(node.request(ref, 1, 0), "file index 1 is past the offer's 1 files")
    refused(node.request(ref, 255, 0), "file index 255 is past the offer's 1 files")
    refused(node.request(ref, 0, 3000), "offset 3000 is at or past the end of file 0 (3000 "
            "bytes)")
    refused(node.request(ref, 0, 2**32 - 1024), "offset 4294966272 is at or past the end of "
            "file 0 (3000 bytes)")
    # Lengths the codec refuses: authentic, answered BAD_PAYLOAD, nothing read.
    for length in (0, wire.OTA_MAX_CHUNK + 1, 0xFFFF):
        answer = node.raw_request(ref.to_bytes(4, "big") + bytes([0]) + (0).to_bytes(4, "big")
                                  + length.to_bytes(2, "big"))
        assert (answer.type, answer.reason_name) == (wire.ERROR_DOWN, "BAD_PAYLOAD")
    # The session goes on: readings are acknowledged, the release is served, the last chunk
    # is what is left of the file.
    assert node.readings(3)[-1].through_seq == node.seq
    last = node.request(ref, 0, 2900)
    assert (last.type, bytes(last.data)) == (wire.OTA_CHUNK, files["/lib/node/app.mpy"][2900:])
    assert node.download(offer) == files
    node.close()

    # A node with another assignment, or none, is not served this one.
    for key in (other, unassigned):
        stranger = Node(key, gateway.port)
        stranger.hello()
        answer = stranger.request(ref, 0, 0)
        assert (answer.reason_name, answer.detail) == (
            "UNSUPPORTED", f"release ref {ref:08x} is not offered to this node")
        stranger.close()
    assert metric(gateway, UNSUPPORTED) == 8

    # Cancelled: no longer offered, its chunks refused (the fleet stops listing it).
    site.cancel(rollout_id)
    wait_until(lambda: node.offer() is None, 5 * REFRESH_S,
               "the offer withdrawn")
    assert node.request(ref, 0, 0).detail == f"release ref {ref:08x} is not offered to this node"
    node.close()


def test_what_a_node_reports_after_its_rollout_paused_still_reaches_the_fleet(
        tmp_path, broker, collector, site, proxy, gateways):
    # The first node of a wave to roll back pauses the rollout, and the fleet lists nothing for
    # it any more; the wave's other nodes roll back after that, and their reports must still
    # reach the fleet, or the rollout would wait for them until their deadline.
    first_key, second_key = site.register(2)
    release = site.upload("0.2.0", bundle(2000))
    rollout_id = site.rollout(release, [first_key, second_key])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")
    first, second = Node(first_key, gateway.port), Node(second_key, gateway.port)
    offer = first.offer()
    assert second.offer().ref == offer.ref
    first.result(offer.ref, wire.OTA_ROLLED_BACK, 0, "import failed: RuntimeError: boom")
    first.close()
    second.close()
    # One failure of two is past the 5 % threshold: paused, and offered no more.
    wait_until(lambda: site.fleet.call("GET", f"/api/rollouts/{rollout_id}",
                                       site.admin)["state"] == "paused", 10, "the pause")
    wait_until(lambda: "OTA assignments: 0 devices" in gateway.log(), 5 * REFRESH_S,
               "the assignments withdrawn")
    late = second
    assert late.offer() is None
    late.result(offer.ref, wire.OTA_ROLLED_BACK, 0, "not confirmed in 3 trial boots")
    late.close()
    devices = {}

    def recorded() -> bool:
        page = site.fleet.call("GET", f"/api/rollouts/{rollout_id}/devices", site.admin)
        devices.update({d["device_id"]: d for d in page["items"]})
        return devices[late.device]["state"] == "rolled_back"

    wait_until(recorded, 10, "the late report applied")
    assert devices[late.device]["reason"] == "not confirmed in 3 trial boots"
    # A ref the node was never offered is still not recorded.
    late.hello()
    late.result(0xDEADBEEF, wire.OTA_FAILED, 0, "made up")
    late.close()
    time.sleep(1)
    assert [state for state, _, _ in progress(collector, late.device)] == [
        "offered", "rolled_back"]
    assert "reports failed for release ref deadbeef ('made up'), which this gateway neither " \
        "offers it nor offered it last: not recorded" in gateway.log()


def test_a_flood_of_chunk_requests_costs_bounded_work_and_other_nodes_readings_go_on(
        tmp_path, broker, collector, site, proxy, gateways):
    flooder_key, neighbour_key = site.register(2)
    files = bundle(20_000, files=1)
    release = site.upload("0.2.0", files)
    site.rollout(release, [flooder_key])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")
    flooder = Node(flooder_key, gateway.port)
    offer = flooder.offer()
    (data,) = files.values()
    requests = 3000
    answers: list[wire.Message] = []

    def flood() -> None:
        # Pipelined without waiting for answers, each for another offset.
        frames = [wire.encode_ota_chunk_request(
            flooder_key, 1, flooder.guard.next_counter(), offer.ref, 0, (i * 977) % 20_000,
            wire.OTA_MAX_CHUNK) for i in range(requests)]
        reader = threading.Thread(target=lambda: answers.extend(
            flooder.read() for _ in range(requests)))
        reader.start()
        flooder.send(b"".join(frames))
        reader.join(120)

    flooding = threading.Thread(target=flood)
    flooding.start()
    neighbour = Node(neighbour_key, gateway.port)
    neighbour.hello()
    for _ in range(20):
        assert neighbour.readings(5)[-1].type == wire.ACK
    flooding.join(120)
    assert len(answers) == requests
    for i, chunk in enumerate(answers):
        offset = (i * 977) % 20_000
        assert chunk.type == wire.OTA_CHUNK and chunk.offset == offset
        assert bytes(chunk.data) == data[offset:offset + wire.OTA_MAX_CHUNK]  # at most 1 KiB
    collector.wait_for(lambda: collector.count(neighbour.device) == 1 + 100,
                       what="the neighbour's readings published")
    flooder.close()
    neighbour.close()


@pytest.mark.parametrize("attack", ["flipped_byte", "foreign_signature", "other_manifest"])
def test_a_release_the_fleets_answers_do_not_vouch_for_is_refused_reported_and_never_offered(
        tmp_path, broker, collector, site, proxy, gateways, attack):
    keys = site.register(2)
    release = site.upload("0.2.0", bundle(4000))
    decoy = site.upload("0.1.9", bundle(1000))  # genuinely signed, but not what was assigned
    path = f"/api/gateway/releases/{release['id']}"
    forger = Ed25519PrivateKey.generate()

    def rewrite(requested: str, body: bytes) -> bytes:
        if attack == "flipped_byte" and requested == path + "/files/1":
            return body[:100] + bytes([body[100] ^ 1]) + body[101:]
        if attack == "foreign_signature" and requested == path:
            doc = json.loads(body)
            doc["signature"] = base64.b64encode(forger.sign(doc["manifest"].encode())).decode()
            return json.dumps(doc).encode()
        if attack == "other_manifest" and requested == path:
            doc = json.loads(body)
            swapped = site.fleet.call("GET", f"/api/gateway/releases/{decoy['id']}",
                                      site.gateway_token)
            doc["manifest"], doc["signature"] = swapped["manifest"], swapped["signature"]
            return json.dumps(doc).encode()
        return body

    proxy.rewrite = rewrite
    rollout_id = site.rollout(release, keys)
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, REFUSED) == 1, 10, "the release refused")

    why = {
        "flipped_byte": "file 1 (/lib/node/part1.mpy): its SHA-256 is ",
        "foreign_signature": "manifest refused: the manifest's signature does not verify with "
                             "the fleet's key",
        "other_manifest": f"manifest refused: its SHA-256 is {manifest_sha256(decoy)[:16]}..., "
                          f"the assignment's {manifest_sha256(release)[:16]}...",
    }[attack]
    for key in keys:
        device = key.device_id.hex()
        collector.wait_for(lambda d=device: progress(collector, d), what="failed reported")
        [(state, done, reason)] = progress(collector, device)
        assert (state, done) == ("failed", 0)
        assert reason.startswith("gateway refused the release: ") and why in reason
        node = Node(key, gateway.port)
        assert node.offer() is None
        answer = node.request(ref_of(release), 0, 0)
        assert answer.reason_name == "UNSUPPORTED"
        node.close()
    with collector.lock:
        assert {p["rollout_id"] for p in collector.ota_progress} == {rollout_id}
    assert cache_folders(gateway) == []
    incoming = gateway.workdir / "data" / "ota-cache" / "incoming"
    assert not any(incoming.rglob("*.part")) and not (incoming / manifest_sha256(release)
                                                      ).exists()
    assert f"release bundle 0.2.0 ({release['id']}) refused, never offered" in gateway.log()
    # Refused once, not fetched again at every listing.
    time.sleep(3 * REFRESH_S)
    assert proxy.count(path) == 1
    assert len(progress(collector, keys[0].device_id.hex())) == 1


def test_the_cache_evicts_the_least_recently_offered_release_never_an_assigned_one(
        tmp_path, broker, collector, site, proxy, gateways, monkeypatch):
    monkeypatch.setenv("KINHBAC_GATEWAY_OTA__CACHE_BYTES", str(64 * 1024))
    keys = site.register(6)
    releases = [site.upload(f"0.{i}.0", bundle(20_000)) for i in range(1, 5)]
    rollouts = [site.rollout(r, [k]) for r, k in zip(releases[:3], keys, strict=False)]
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    nodes = [Node(k, gateway.port) for k in keys]
    wait_until(lambda: metric(gateway, CACHED) == 3, 10, "three releases cached")
    sha = [manifest_sha256(r) for r in releases]
    assert cache_folders(gateway) == sorted(sha[:3])

    # Offered: release 2 first, then release 1; release 3 never. Then rollouts 1 and 2 end.
    for node in (nodes[1], nodes[0]):
        assert node.offer() is not None
        time.sleep(0.05)
    site.cancel(rollouts[0])
    site.cancel(rollouts[1])

    # A fourth needs room: of the two no rollout needs, the one offered longer ago goes (3, the
    # one assigned, stays however long ago it was cached).
    rollouts.append(site.rollout(releases[3], [keys[3]]))
    wait_until(lambda: metric(gateway, CACHED) == 4, 10, "the fourth release cached")
    assert cache_folders(gateway) == sorted([sha[0], sha[2], sha[3]])
    assert f"OTA cache: evicted release bundle 0.2.0 ({sha[1][:16]}" in gateway.log()

    # Larger than the whole cache: refused, reported failed, never offered.
    too_large = site.upload("0.9.0", bundle(70_000))
    site.rollout(too_large, [keys[4]])
    wait_until(lambda: metric(gateway, REFUSED) == 1, 10, "the large release refused")
    collector.wait_for(lambda: progress(collector, keys[4].device_id.hex()),
                       what="failed reported")
    [(state, _, reason)] = progress(collector, keys[4].device_id.hex())
    assert state == "failed" and "more than the gateway's OTA cache holds (ota.cache_bytes " \
        "65536)" in reason
    assert nodes[4].offer() is None

    # 30 KB more than the assigned ones (3 and 4) leave room for, once release 1 is evicted:
    # it waits, nothing assigned is evicted, until rollout 3 ends.
    waiting = site.upload("0.8.0", bundle(30_000))
    site.rollout(waiting, [keys[5]])
    wait_until(lambda: "the OTA cache is full" in gateway.log(), 10, "the wait logged")
    assert sha[2] in cache_folders(gateway) and sha[3] in cache_folders(gateway)
    assert nodes[5].offer() is None
    assert not progress(collector, keys[5].device_id.hex())  # not refused: it waits
    site.cancel(rollouts[2])
    wait_until(lambda: metric(gateway, CACHED) == 5, 10, "the waiting release cached")
    assert cache_folders(gateway) == sorted([sha[3], manifest_sha256(waiting)])
    assert nodes[5].offer().ref == ref_of(waiting)
    for node in nodes:
        node.close()


def test_a_lowered_cache_limit_evicts_what_no_rollout_needs_at_the_next_start(
        tmp_path, broker, collector, site, proxy, gateways, monkeypatch):
    keys = site.register(3)
    releases = [site.upload(f"0.{i}.0", bundle(40_000)) for i in range(1, 4)]
    rollouts = [site.rollout(r, [k]) for r, k in zip(releases, keys, strict=True)]
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 3, 10, "three releases cached")
    nodes = [Node(k, gateway.port) for k in keys]
    for node in (nodes[1], nodes[0]):  # release 3 never offered: it is the oldest
        assert node.offer() is not None
        node.close()
        time.sleep(0.05)
    site.cancel(rollouts[0])
    site.cancel(rollouts[2])
    assert gateway.terminate() == 0

    # 80,000 bytes now: release 2 is still assigned, of the others the older offer goes.
    monkeypatch.setenv("KINHBAC_GATEWAY_OTA__CACHE_BYTES", "80000")
    gateway.start()
    sha = [manifest_sha256(r) for r in releases]
    wait_until(lambda: cache_folders(gateway) == sorted(sha[:2]), 10, "release 3 evicted")
    assert "OTA cache over its limit (ota.cache_bytes 80000): evicted release bundle 0.3.0" \
        in gateway.log()
    assert Node(keys[1], gateway.port, boot=2).offer().ref == ref_of(releases[1])


def test_a_cut_download_resumes_with_a_range_request_from_the_byte_it_reached(
        tmp_path, broker, collector, site, proxy, gateways):
    (key,) = site.register(1)
    files = bundle(100_000, files=1)
    release = site.upload("0.2.0", files)
    path = f"/api/gateway/releases/{release['id']}/files/0"
    proxy.cut[path] = 65_536 + 1000  # a little past the gateway's first block
    site.rollout(release, [key])
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")

    with proxy.lock:
        tries = [(r, s) for p, r, s in proxy.requests if p == path]
    first, resumed = tries
    assert first == (None, 200)
    start = int(resumed[0].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 65_536 + 1000 and resumed == (f"bytes={start}-", 206)
    assert f"resuming release {release['id']} file 0 (/lib/node/part0.mpy) at byte {start}" \
        in gateway.log()
    node = Node(key, gateway.port)
    assert node.download(node.offer()) == files
    node.close()


def test_the_cache_and_the_progress_outbox_survive_a_restart_and_an_uplink_outage(
        tmp_path, broker, collector, site, proxy, gateways):
    keys = site.register(2)
    files = bundle(3000, files=1)
    release = site.upload("0.2.0", files)
    site.rollout(release, keys)
    gateway = start_gateway(tmp_path, broker, proxy, site, gateways)
    wait_until(lambda: metric(gateway, CACHED) == 1, 10, "the release cached")

    broker.stop()  # the uplink is down from here on
    node = Node(keys[0], gateway.port)
    offer = node.offer()
    node.result(offer.ref, wire.OTA_DOWNLOADING, 0)
    node.download(offer)
    node.result(offer.ref, wire.OTA_VERIFYING, 3000)
    node.close()
    outbox = gateway.workdir / "data" / "queue.sqlite3"
    assert outbox.exists()
    gateway.kill()  # a power cut, the uplink still down

    # Back without the fleet: the cache and the assignments are on disk, nothing is fetched.
    site.fleet.stop()
    requests_before = len(proxy.requests)
    gateway.start()
    assert f"OTA cache {gateway.workdir / 'data' / 'ota-cache'}: 1 releases, 3000 of" \
        in gateway.log()
    assert "OTA assignments from the cache" in gateway.log()
    node = Node(keys[0], gateway.port, boot=2)  # it restarted too, and resumes
    again = node.offer()
    assert (again.ref, again.files) == (offer.ref, offer.files)  # the same ref
    chunk = node.request(again.ref, 0, 1024)
    assert bytes(chunk.data) == files["/lib/node/part0.mpy"][1024:2048]
    node.result(again.ref, wire.OTA_INSTALLED, 3000)
    node.close()
    other = Node(keys[1], gateway.port)
    assert other.offer().ref == offer.ref
    other.close()
    assert not collector.ota_progress
    assert not any(p.startswith("/api/gateway/releases")
                   for p, _, _ in proxy.requests[requests_before:])

    broker.start()  # the uplink is back: everything kept goes, in order
    collector.wait_for(lambda: len(progress(collector, keys[0].device_id.hex())) >= 5,
                       timeout=30, what="the first node's progress")
    steps = [s for s, _, _ in progress(collector, keys[0].device_id.hex())]
    # "offered" once before the restart, once after (the gateway remembers offers in memory:
    # a repeat the fleet records and ignores).
    assert steps == ["offered", "downloading", "verifying", "offered", "installed"]
    collector.wait_for(lambda: progress(collector, keys[1].device_id.hex()) == [
        ("offered", 0, "")], what="the second node's offer")
    wait_until(lambda: _outbox_rows(outbox) == 0, 10, "the outbox emptied after PUBACKs")


def _outbox_rows(path: Path) -> int:
    import apsw

    db = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        db.close()


def test_the_ota_settings_default_to_a_cache_under_the_data_dir_of_64_mib(tmp_path,
                                                                           monkeypatch):
    from kinhbac.gateway.config import ConfigError, load_settings

    config = tmp_path / "gateway.toml"
    config.write_text(f'site = "s1"\ndata_dir = "{tmp_path / "data"}"\n'
                      'fleet_url = "https://fleet.example.org"\nfleet_token = "kbg_x"\n')
    settings = load_settings(config)
    assert settings.ota_cache_dir == tmp_path / "data" / "ota-cache"
    assert settings.ota.cache_bytes == 64 * 1024 * 1024
    monkeypatch.setenv("KINHBAC_GATEWAY_OTA__CACHE_DIR", str(tmp_path / "sd"))
    monkeypatch.setenv("KINHBAC_GATEWAY_OTA__CACHE_BYTES", "1048576")
    settings = load_settings(config)
    assert (settings.ota_cache_dir, settings.ota.cache_bytes) == (tmp_path / "sd", 1048576)
    monkeypatch.setenv("KINHBAC_GATEWAY_OTA__CACHE_BYTES", "1000")
    with pytest.raises(ConfigError, match="ota.cache_bytes"):
        load_settings(config)


def test_a_node_running_the_real_firmware_is_updated_from_the_fleet_and_confirms(
        tmp_path, broker, collector, site, proxy, gateways, emulator):
    # The whole path: an admin's release and rollout, this gateway, and an emulated board
    # running the firmware, whose confirmation reaches the fleet's rollout through the broker.
    from test_gateway_fleet_keys import NODE_SETTINGS, firmware

    from kinhbac.firmware import bundle_files, config_file

    gateway = GatewayProcess(tmp_path / "gw", key_file=None, broker_port=broker.port,
                             fleet_url=proxy.url, fleet_token=site.gateway_token,
                             key_refresh_s=REFRESH_S)
    gateways.append(gateway)
    board = emulator.add_board()
    device = site.fleet.call("POST", "/api/devices", site.technician, 201,
                             json={"mac": board.mac.hex(":"), "site_id": site.site_id})
    secret = bytes.fromhex(device["secret"])
    node = launcher.wired_node(board, wire.Key(bytes.fromhex(device["wire_id"]), device["key_id"],
                                      secret), secret)
    board.write_files(firmware() | config_file(
        launcher.node_config(node, gateway.port, emulator, **NODE_SETTINGS)))
    gateway.start()
    board.power_on()
    collector.wait_for(lambda: collector.count(node.device) >= 10, timeout=60,
                       what="readings before the update")

    files = bundle_files()
    release = site.upload("0.2.0", files)
    rollout_id = site.fleet.call("POST", "/api/rollouts", site.admin, 201, json={
        "release_id": release["id"], "waves": [100],
        "target": {"devices": [node.device]}})["id"]
    wait_until(lambda: site.fleet.call("GET", f"/api/rollouts/{rollout_id}/devices",
                                       site.admin)["items"][0]["state"] == "confirmed",
               300, "the fleet's rollout records the device confirmed")
    steps = list(dict.fromkeys(s for s, _, _ in progress(collector, node.device)))
    assert steps == ["offered", "downloading", "verifying", "installed", "rebooting",
                     "confirmed"]
    status = collector.retained[f"kinhbac/{SITE}/{node.device}/status"]
    assert status["firmware"] == "0.2.0"
    before = collector.count(node.device)
    collector.wait_for(lambda: collector.count(node.device) >= before + 20, timeout=60,
                       what="readings after the update")
    assert proxy.count(f"/api/gateway/releases/{release['id']}") == 1
    for index in range(len(files)):
        assert proxy.count(f"/api/gateway/releases/{release['id']}/files/{index}") == 1


def test_a_progress_message_whose_commit_failed_is_kept_with_the_next_and_survives_a_restart(
        tmp_path):
    # The outbox on a card whose fsync fails once (EIO), as the readings meet it.
    import asyncio

    from helpers.faulty_disk import FaultyDisk

    from kinhbac.gateway.queue import Queue

    path, device = tmp_path / "queue.sqlite3", "6b62000000000042"

    async def main(disk: FaultyDisk) -> None:
        queue = Queue(path, disk_cap_bytes=0, max_age_s=3600)
        await queue.open()
        disk.fail_syncs(1)
        queue.send_later(device, "ota", b'{"state":"offered"}')
        queue.send_later(device, "ota", b'{"state":"downloading"}')
        deadline = time.monotonic() + 10
        while len(await queue.fetch_outbox(0, 10)) < 2:
            assert time.monotonic() < deadline, "the failed commit's messages were not redone"
            await asyncio.sleep(0.05)
        assert queue.stats.storage_faults.get("io_error") == 1
        await queue.close()

        queue = Queue(path, disk_cap_bytes=0, max_age_s=3600)  # a restart
        await queue.open()
        rows = await queue.fetch_outbox(0, 10)
        assert [(r.device, r.kind, r.payload) for r in rows] == [
            (device, "ota", b'{"state":"offered"}'), (device, "ota", b'{"state":"downloading"}')]
        assert queue.stats.outbox_depth == 2
        queue.forget_outbox([rows[0].id])  # the broker acknowledged the first
        await queue.maintain()
        assert [r.payload for r in await queue.fetch_outbox(0, 10)] == [
            b'{"state":"downloading"}']
        assert queue.stats.outbox_depth == 1
        await queue.close()

    with FaultyDisk() as disk:
        asyncio.run(main(disk))
