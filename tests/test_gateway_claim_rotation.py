"""A site's claim key rotated, at the gateway, from the side of whoever kept the old key: the
gateway picks the new key up with its key refresh, takes CLAIM frames under the old one only
until its expiry by its own clock (also when it cannot reach the fleet, also from its cache),
answers each board under the key it holds, and holds its claim reports while the fleet answers
429. In process with a settable clock where the clock matters, end to end (the fleet over HTTP,
a gateway process, frames from the test) for the rest; no test waits more than a few seconds."""

import asyncio
import json
import os
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
from helpers.fleet import running_fleet, wait_until
from helpers.gateway import GatewayProcess, read_exactly
from test_gateway_fleet_keys import ADMIN, REFRESH_S, Site, claim_and_answer

from kinhbac import wire
from kinhbac.fleet.rate_limits import ClaimLimiter
from kinhbac.gateway.keys import FileKeyStore, FleetKeyStore, parse_keys

OLD = "the claim key from before the rotation"
NEW = "the claim key from after the rotation"
BAD_MAC = 'kinhbac_gateway_frames_refused_total{reason="bad_mac"}'


def board(claim_key: str) -> wire.Key:
    """A claiming board: its wire id ("kb" + a unicast MAC) and the claim key it holds."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFE) | 0x02  # unicast, locally administered: never a real device's
    return wire.Key(b"kb" + bytes(mac), wire.CLAIM_KEY_ID, claim_key.encode())


def listing(expires_at: datetime | None, **extra) -> dict:
    doc = {"devices": [], "claim_key": NEW, **extra}
    if expires_at is not None:
        doc["previous_claim_key"] = {"claim_key": OLD, "expires_at": expires_at.isoformat()}
    return doc


def claim(store, key: wire.Key, counter: int = 1) -> wire.Message:
    """A CLAIM of `key`'s board through the gateway's lookup (FrameError if refused)."""
    frame = wire.encode_claim(key, 1, counter, bytes(16), "0.1.0")
    return wire.decode(frame, store.lookup, wire.ReplayGuard())


def answer_verifies_at_the_board(store, key: wire.Key, msg: wire.Message) -> bool:
    """The gateway's ERROR answer to the board's CLAIM, as its listener signs it (under the key
    lookup gives after the frame), checked by the board with the one key it holds."""
    signing = store.lookup(key.device_id, wire.CLAIM_KEY_ID)
    answer = wire.encode_error(signing, msg.boot, wire.downlink_counter(msg.counter, 0),
                               wire.CLAIM_PENDING, msg.counter, "awaiting approval")
    guard = wire.DownlinkGuard(msg.boot)
    guard.last_sent = msg.counter
    try:
        wire.decode(answer, wire.lookup_for(key), guard, downlink=True)
    except wire.FrameError:
        return False
    return True


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_the_old_key_is_taken_until_its_expiry_by_the_gateways_own_clock(tmp_path):
    expires = datetime.now(UTC) + timedelta(hours=72)
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps(listing(expires)))
    store = FileKeyStore(key_file)
    store._clock = clock = Clock()
    old_board, new_board = board(OLD), board(NEW)
    stranger = board("a key this site never had")

    for key in (old_board, new_board):
        msg = claim(store, key)
        assert answer_verifies_at_the_board(store, key, msg)  # each under the key it holds
    with pytest.raises(wire.FrameError) as forged:
        claim(store, stranger)
    assert forged.value.reason == wire.BAD_MAC

    clock.now = expires.timestamp()  # the listing still names the old key: the clock decides

    with pytest.raises(wire.FrameError) as late:
        claim(store, old_board, counter=2)
    assert late.value.reason == wire.BAD_MAC  # the same reason code as any forged claim
    assert answer_verifies_at_the_board(store, new_board, claim(store, new_board, counter=2))


def test_a_listing_with_only_a_claim_key_still_parses_and_caches_as_it_did():
    old_style = {"devices": [], "claim_key": NEW, "claims": [], "configs": []}
    parsed = parse_keys(old_style)
    assert parsed.previous_claim_key is None
    assert parsed.doc == old_style  # a cache written before rotation is not rewritten
    with_previous = parse_keys(listing(datetime(2026, 12, 1, tzinfo=UTC)))
    assert with_previous.doc["previous_claim_key"] == {
        "claim_key": OLD, "expires_at": "2026-12-01T00:00:00+00:00"}
    for broken in ({"claim_key": OLD}, {"claim_key": OLD, "expires_at": "2026-12-01T00:00:00"},
                   {"claim_key": "short", "expires_at": "2026-12-01T00:00:00Z"}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            parse_keys(listing(None, previous_claim_key=broken))


def test_a_gateway_starting_from_its_cache_without_the_fleet_refuses_the_old_key_on_time(
        tmp_path):
    expires = datetime.now(UTC) + timedelta(hours=1)
    cache = tmp_path / "fleet-keys.json"
    cache.write_text(json.dumps(parse_keys(listing(expires)).doc))
    store = FleetKeyStore(url="http://127.0.0.1:9", token="kbg_x", cache_file=cache)
    store._clock = clock = Clock()
    old_board = board(OLD)

    claim(store, old_board)
    assert asyncio.run(store.update()) is False  # the fleet is unreachable
    clock.now = expires.timestamp() + 1

    with pytest.raises(wire.FrameError) as late:
        claim(store, old_board, counter=2)
    assert late.value.reason == wire.BAD_MAC


# ---- end to end: the fleet over HTTP, a gateway process


@pytest.fixture
def fleet(tmp_path, monkeypatch, broker):
    with running_fleet(tmp_path / "fleet", broker.port, monkeypatch, ADMIN) as server:
        yield server


def gateway_for(tmp_path, broker, fleet, site) -> GatewayProcess:
    return GatewayProcess(tmp_path / "gw", key_file=None, broker_port=broker.port,
                          fleet_url=fleet.url, fleet_token=site.gateway_token,
                          key_refresh_s=REFRESH_S)


def pending_at(site: Site) -> set[str]:
    found = site.fleet.call("GET", "/api/devices", site.admin, params={"state": "pending"})
    return {device["wire_id"] for device in found["items"]}


class Board:
    """A claiming board as the test plays it: one nonce, counters that go up."""

    def __init__(self, claim_key: str) -> None:
        self.key = board(claim_key)
        self.wire_id = self.key.device_id.hex()
        self.nonce = os.urandom(16)
        self.counter = 0

    def claim(self, port: int, identity: wire.Key | None = None):
        """One CLAIM; the gateway's answer, verified as the board does: under its claim key,
        or an IDENTITY under `identity` (the key its approval derives). None: closed."""
        self.counter += 1
        if identity is None:
            return claim_and_answer(port, self.key, 1, self.counter, self.nonce)
        guard = wire.DownlinkGuard(1)
        guard.last_sent = self.counter
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(wire.encode_claim(self.key, 1, self.counter, self.nonce, "0.1.0"))
            header = read_exactly(conn, wire.HEADER_SIZE)
            frame = header + read_exactly(conn, wire.frame_length(header) - wire.HEADER_SIZE)
        keys = {wire.CLAIM_KEY_ID: self.key, identity.key_id: identity}
        return wire.decode(frame, lambda _device, key_id: keys.get(key_id, wire.UNKNOWN_KEY),
                           guard, downlink=True)


def test_a_gateway_picks_up_a_rotated_key_and_takes_the_old_one_only_until_the_overlap_ends(
        tmp_path, fleet, broker):
    """Old key accepted during the overlap; the new key from the gateway's next refresh; the
    fleet then goes down before the overlap ends, and the gateway refuses the old key on time
    by its own clock."""
    overlap_s = 5.0
    site = Site(fleet)
    gateway = gateway_for(tmp_path, broker, fleet, site)
    try:
        gateway.start()
        old = fleet.call("GET", f"/api/sites/{site.site_id}/profile", site.technician)
        before = Board(old["claim_key"])
        assert before.claim(gateway.port).reason == wire.CLAIM_PENDING

        fleet.call("POST", f"/api/sites/{site.site_id}/claim-key/rotate", site.admin,
                   json={"overlap_hours": overlap_s / 3600})
        rotated_at = time.monotonic()
        new_key = fleet.call("GET", f"/api/sites/{site.site_id}/profile",
                             site.technician)["claim_key"]
        after = Board(new_key)
        took = wait_until(lambda: after.claim(gateway.port) is not None, REFRESH_S + 2,
                          "a claim under the new key taken")
        print(f"the new claim key taken {took:.2f} s after the rotation")
        on_old = Board(old["claim_key"])
        answer = on_old.claim(gateway.port)  # the gateway now holds both: the old is previous
        assert answer is not None and answer.reason == wire.CLAIM_PENDING
        assert time.monotonic() - rotated_at < overlap_s, "too slow to test the overlap"
        assert "the site's claim key was rotated (now " in gateway.log()
        assert "the previous one is taken until " in gateway.log()
        wait_until(lambda: {after.wire_id, on_old.wire_id} <= pending_at(site), 5,
                   "both claims pending in the fleet")

        fleet.stop()  # from here the gateway cannot refresh: its own clock decides
        refused_before = gateway.metrics().get(BAD_MAC, 0)
        wait_until(lambda: time.monotonic() - rotated_at > overlap_s + 0.5, overlap_s + 1,
                   "the overlap over")
        assert on_old.claim(gateway.port) is None  # closed: BAD_MAC
        assert before.claim(gateway.port) is None
        assert gateway.metrics().get(BAD_MAC, 0) == refused_before + 2
        assert after.claim(gateway.port).reason == wire.CLAIM_PENDING
        assert gateway.proc.poll() is None
    finally:
        gateway.stop()


def test_a_board_that_claimed_under_the_old_key_gets_the_identity_that_key_derives(
        tmp_path, fleet, broker):
    site = Site(fleet)
    gateway = gateway_for(tmp_path, broker, fleet, site)
    try:
        gateway.start()
        old = fleet.call("GET", f"/api/sites/{site.site_id}/profile", site.technician)
        fleet.call("POST", f"/api/sites/{site.site_id}/claim-key/rotate", site.admin)
        new_key = fleet.call("GET", f"/api/sites/{site.site_id}/profile",
                             site.technician)["claim_key"]
        wait_until(lambda: Board(new_key).claim(gateway.port) is not None, REFRESH_S + 2,
                   "the gateway holding the new key")
        flashed_before = Board(old["claim_key"])  # with a profile kept from before
        assert flashed_before.claim(gateway.port).reason == wire.CLAIM_PENDING
        wait_until(lambda: flashed_before.wire_id in pending_at(site), 5, "the claim pending")
        device = site.device(flashed_before.wire_id)

        fleet.call("POST", f"/api/devices/{device['id']}/approve", site.admin)

        secret = wire.claim_secret(old["claim_key"].encode(), flashed_before.key.device_id,
                                   flashed_before.nonce)
        derived = wire.Key(flashed_before.key.device_id, 1, secret)

        took = wait_until(
            lambda: isinstance(flashed_before.claim(gateway.port, derived),
                               wire.IdentityMessage),
            REFRESH_S + 3, "IDENTITY under the secret the old key derives")
        print(f"identity sent {took:.2f} s after the approval")
    finally:
        gateway.stop()


def test_a_gateway_holds_its_claim_reports_while_the_fleet_answers_429(
        tmp_path, fleet, broker):
    """A flood of claims at one gateway: past the fleet's limit the gateway hears 429, logs it
    once, answers its boards CLAIM_PENDING, sends nothing until Retry-After, and reports the
    held claims with their boards' later claims."""
    fleet.server.config.app.state.claim_limiter = ClaimLimiter(per_gateway=2, per_site=100,
                                                               window_s=1.0)
    site = Site(fleet)
    gateway = gateway_for(tmp_path, broker, fleet, site)
    try:
        gateway.start()
        claim_key = fleet.call("GET", f"/api/sites/{site.site_id}/profile",
                               site.technician)["claim_key"]
        boards = [Board(claim_key) for _ in range(6)]
        for one in boards:
            assert one.claim(gateway.port).reason == wire.CLAIM_PENDING
        wait_until(lambda: "HTTP 429: too many claims from this gateway" in gateway.log(), 5,
                   "the 429 logged")
        assert "holding claim reports for 1 s" in gateway.log()
        held = len(pending_at(site))
        assert held < len(boards)

        time.sleep(1.1)  # Retry-After: 1 s
        for one in boards:
            assert one.claim(gateway.port).reason == wire.CLAIM_PENDING
            time.sleep(0.6)  # within the fleet's limit of 2 a second
        wait_until(lambda: {one.wire_id for one in boards} <= pending_at(site), 10,
                   "every held claim reported with a later claim")
        assert gateway.log().count("not reported") == 1  # once a minute at most
        assert gateway.proc.poll() is None
    finally:
        gateway.stop()
