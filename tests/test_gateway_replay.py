"""Replay windows across gateway restarts, from the attacker's side: frames recorded on the
site's WiFi (a CLAIM, READINGS under a device's own key, under a key it had before it was
re-provisioned) are sent again to the real gateway process after it restarted, and refused as
they were before the restart; the honest node's next frames are still taken, in order."""

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import pytest
from helpers.gateway import GatewayProcess, exchange

from kinhbac import wire
from kinhbac.gateway import listener
from kinhbac.gateway.config import GatewaySettings, MqttSettings
from kinhbac.gateway.daemon import Gateway

CLAIM_KEY = "the site's claim key for tests"
BOARD = bytes.fromhex("6b6202aabbccdd01")  # "kb" and a MAC: an id that may claim
NONCE = bytes(range(16))
BASE_MS = 1_800_000_000_000


def write_keys(path: Path, devices: list[tuple[wire.Key, bytes]] = (),
               claims: list[tuple[bytes, bytes, int]] = (),
               configs: dict[bytes, dict] | None = None) -> None:
    """A key file as the gateway's fleet cache holds one: device keys, the site's claim key,
    approved claims (device id, nonce, key id) and node settings."""
    path.write_text(json.dumps({
        "devices": [{"device_id": k.device_id.hex(), "key_id": k.key_id, "secret": s.hex()}
                    for k, s in devices],
        "claim_key": CLAIM_KEY,
        "claims": [{"device_id": d.hex(), "nonce": n.hex(), "key_id": k} for d, n, k in claims],
        "configs": [{"device_id": d.hex(), "settings": s} for d, s in (configs or {}).items()],
    }))


def device_key(device_id: bytes, key_id: int) -> tuple[wire.Key, bytes]:
    secret = os.urandom(32)
    return wire.Key(device_id, key_id, secret), secret


def refused_as(answers: list[wire.Message]) -> str:
    assert len(answers) == 1 and answers[0].type == wire.ERROR_DOWN, answers
    return wire.reason_name(answers[0].reason)


def readings(key: wire.Key, boot: int, counter: int, first_seq: int,
             count: int = 5) -> bytes:
    return wire.encode_readings(key, boot, counter, boot, first_seq, BASE_MS, False,
                                [(0, 10 * i, 20.0 + first_seq + i) for i in range(count)])


def hello(key: wire.Key, boot: int, counter: int, fw_version: str = "0.2.0") -> bytes:
    return wire.encode_hello(key, boot, counter, fw_version, wire.RESET_POWER_ON, [0, 0, 0],
                             [["temperature", "C"]])


def acked_through(answers: list[wire.Message]) -> list[int | None]:
    assert all(a.type == wire.ACK for a in answers), answers
    return [a.through_seq for a in answers]


@pytest.fixture
def gateway(tmp_path, broker):
    gw = GatewayProcess(tmp_path / "gw", key_file=tmp_path / "keys.json",
                        broker_port=broker.port)
    yield gw
    gw.stop()


def test_a_recorded_claim_sent_again_after_a_gateway_restart_is_refused_as_a_replay(
        tmp_path, gateway):
    write_keys(tmp_path / "keys.json")
    claim = wire.Key(BOARD, wire.CLAIM_KEY_ID, CLAIM_KEY.encode())
    gateway.start()
    recorded = wire.encode_claim(claim, 1, 1, NONCE, "0.1.0")
    [pending] = exchange(gateway.port, [recorded], [claim], 1, 1)
    assert pending.type == wire.ERROR_DOWN and pending.reason == wire.CLAIM_PENDING

    assert gateway.terminate() == 0
    gateway.start()
    # Before, the window of a CLAIM was kept in memory only: each restart let it in again,
    # reported to the fleet again.
    assert refused_as(exchange(gateway.port, [recorded], [claim], 1, 1)) == "REPLAY"
    # The board asking again, with its next counter, is still answered.
    [again] = exchange(gateway.port, [wire.encode_claim(claim, 1, 2, NONCE, "0.1.0")], [claim],
                       1, 1)
    assert again.type == wire.ERROR_DOWN and again.reason == wire.CLAIM_PENDING
    assert gateway.metrics()['kinhbac_gateway_frames_refused_total{reason="replay"}'] == 1
    assert gateway.metrics()['kinhbac_gateway_claims_total{outcome="pending"}'] == 1


def test_claims_under_a_devices_id_move_nothing_of_its_own_across_a_restart(
        tmp_path, gateway, collector):
    """The board claims, is approved, and flows as itself. Someone with the claim key sends
    claims under its id with a boot far ahead (an approved id may claim again). Had the claim's
    window replaced the device's own, its frames would be refused as STALE_BOOT after the
    restart; its CONFIG would be taken as delivered had a claim touched its row."""
    keys = tmp_path / "keys.json"
    write_keys(keys)
    claim = wire.Key(BOARD, wire.CLAIM_KEY_ID, CLAIM_KEY.encode())
    gateway.start()
    recorded_claim = wire.encode_claim(claim, 1, 1, NONCE, "0.1.0")
    [pending] = exchange(gateway.port, [recorded_claim], [claim], 1, 1)
    assert pending.reason == wire.CLAIM_PENDING

    # An admin approves: the fleet's listing now has the device's key and its claim.
    own, secret = device_key(BOARD, 1)
    write_keys(keys, [(own, secret)], [(BOARD, NONCE, 1)], {BOARD: {"interval_ms": 200}})
    assert gateway.terminate() == 0
    gateway.start()
    [identity] = exchange(gateway.port, [wire.encode_claim(claim, 1, 2, NONCE, "0.1.0")],
                          [claim, own], 1, 1)
    assert (identity.type, identity.key_id) == (wire.IDENTITY, 1)
    far = 1 << 30
    forged = wire.encode_claim(claim, far, 1, os.urandom(16), "evil")
    assert exchange(gateway.port, [forged], [claim], far, 1)[0].reason == wire.CLAIM_PENDING

    # The node restarts as itself (boot 2) and sends readings; one frame is recorded.
    recorded = readings(own, 2, 2, 1)
    answers = exchange(gateway.port, [hello(own, 2, 1), recorded, readings(own, 2, 3, 6)],
                       [own], 2, 4)
    assert [a.type for a in answers] == [wire.ACK, wire.CONFIG, wire.ACK, wire.ACK]
    assert acked_through([answers[0], *answers[2:]]) == [None, 5, 10]

    assert gateway.terminate() == 0
    gateway.start()
    assert exchange(gateway.port, [wire.encode_claim(claim, far, 2, os.urandom(16), "evil")],
                    [claim], far, 1)[0].reason == wire.CLAIM_PENDING
    # The device's next frames of the same boot: taken, in order; CONFIG was delivered once.
    answers = exchange(gateway.port, [hello(own, 2, 4), readings(own, 2, 5, 11),
                                      readings(own, 2, 6, 16)], [own], 2, 3)
    assert acked_through(answers) == [None, 15, 20]
    # What was recorded stays refused: its frame, and the first claim (older than the forged).
    assert refused_as(exchange(gateway.port, [recorded], [own], 2, 1)) == "REPLAY"
    assert refused_as(exchange(gateway.port, [recorded_claim], [claim], 1, 1)) == "STALE_BOOT"

    device = BOARD.hex()
    collector.wait_for(lambda: collector.count(device) >= 20, timeout=30,
                       what="the device's readings at the broker")
    assert collector.arrival[device] == [(2, s) for s in range(1, 21)]
    status = collector.retained[f"kinhbac/testsite/{device}/status"]
    assert status["firmware"] == "0.2.0"


def test_a_frame_recorded_under_a_devices_earlier_key_is_refused_after_it_was_rekeyed(
        tmp_path, gateway):
    """Key id 1, then 2 after a re-provisioning; then the gateway restarts with key id 1 again
    (a key file restored from a backup). The queue used to keep only the latest key's window."""
    keys = tmp_path / "keys.json"
    device = bytes.fromhex("6b62000000000007")
    first, first_secret = device_key(device, 1)
    write_keys(keys, [(first, first_secret)])
    gateway.start()
    recorded = readings(first, 1, 2, 1)
    assert acked_through(exchange(gateway.port, [hello(first, 1, 1), recorded], [first], 1,
                                  2)) == [None, 5]

    second, second_secret = device_key(device, 2)
    write_keys(keys, [(second, second_secret)])
    assert gateway.terminate() == 0
    gateway.start()
    assert acked_through(exchange(gateway.port, [hello(second, 1, 1), readings(second, 1, 2, 6)],
                                  [second], 1, 2)) == [None, 10]

    write_keys(keys, [(first, first_secret)])
    assert gateway.terminate() == 0
    gateway.start()
    assert refused_as(exchange(gateway.port, [recorded], [first], 1, 1)) == "REPLAY"


def test_an_acknowledged_frames_window_is_on_disk_when_the_gateway_loses_power(
        tmp_path, gateway):
    device = bytes.fromhex("6b62000000000008")
    own, secret = device_key(device, 1)
    write_keys(tmp_path / "keys.json", [(own, secret)])
    gateway.start()
    recorded = readings(own, 3, 2, 1)
    assert acked_through(exchange(gateway.port, [hello(own, 3, 1), recorded], [own], 3,
                                  2)) == [None, 5]
    gateway.kill()

    with sqlite3.connect(gateway.workdir / "data" / "queue.sqlite3") as db:
        window = db.execute("SELECT frame_boot, frame_counter FROM replay_windows WHERE "
                            "device=? AND key_id=1", (device.hex(),)).fetchone()
    assert window == (3, 2)
    gateway.start()
    assert refused_as(exchange(gateway.port, [recorded], [own], 3, 1)) == "REPLAY"


def test_claim_windows_are_bounded_the_least_recently_claimed_forgotten_first(
        tmp_path, broker, monkeypatch):
    """Whoever holds the claim key can claim under any number of ids: their windows must not
    grow the gateway's memory and disk without bound."""
    monkeypatch.setattr(listener, "MAX_CLAIM_WINDOWS", 3)
    write_keys(tmp_path / "keys.json")
    settings = GatewaySettings(
        site="testsite", gateway_id="gw1", listen_host="127.0.0.1", listen_port=0,
        data_dir=tmp_path / "data", key_file=tmp_path / "keys.json", metrics_port=0,
        mqtt=MqttSettings(port=broker.port))
    boards = [wire.Key(bytes.fromhex(f"6b6202aabbcc{i:04x}"), wire.CLAIM_KEY_ID,
                       CLAIM_KEY.encode()) for i in range(6)]

    def claim(i: int, counter: int = 1) -> str:
        frame = wire.encode_claim(boards[i], 1, counter, NONCE, "0.1.0")
        return wire.reason_name(exchange(port, [frame], [boards[i]], 1, 1)[0].reason)

    async def main() -> tuple[list[str], list[str]]:
        nonlocal port
        gateway = Gateway(settings)
        run = asyncio.create_task(gateway.run())
        await asyncio.wait_for(gateway.ready.wait(), 20)
        port = gateway.listener.port

        def traffic() -> None:
            assert [claim(i) for i in range(5)] == ["CLAIM_PENDING"] * 5  # 0 and 1 forgotten
            assert claim(2, counter=2) == "CLAIM_PENDING"  # 2 is the most recent now
            assert claim(5) == "CLAIM_PENDING"  # 3 forgotten
            assert claim(4) == "REPLAY"  # kept ones are still refused

        await asyncio.to_thread(traffic)
        kept = list(gateway.listener._claim_windows)
        forgotten = [b.device_id for b in boards
                     if gateway.listener.guard.latest(b.device_id, wire.CLAIM_KEY_ID) is None]
        gateway.stop()
        await asyncio.wait_for(run, 30)
        return kept, [wire.device_hex(d) for d in forgotten]

    port = 0
    kept, forgotten = asyncio.run(main())
    ids = [wire.device_hex(b.device_id) for b in boards]
    assert kept == [ids[4], ids[2], ids[5]]
    assert forgotten == [ids[0], ids[1], ids[3]]
    with sqlite3.connect(tmp_path / "data" / "queue.sqlite3") as db:
        on_disk = [d for (d,) in db.execute("SELECT device FROM replay_windows WHERE key_id=?",
                                            (wire.CLAIM_KEY_ID,))]
        devices = db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
    assert sorted(on_disk) == sorted(kept)
    assert devices == 0  # a claim is no device: it made no row there
