"""The node firmware through the outages a site has (issue 12, findings 2 and 9), on emulated
boards running the real firmware: the access point down for ten minutes while claiming and in
deep sleep, a two-hour gateway outage with its no-network reboots, a day of readings held on
flash, and a gateway that restarts now and then.

Time is real, so each outage is the field's in the firmware's own terms: the settings it is
measured against (watchdog, safe mode, the no-network reboot, the sampling interval) are
shortened, and the outage outlasts each of them as many times as it would in the field. What no
setting shortens runs at full length: net.py's 15 s WiFi attempt and 5 s connect deadline. The
WiFi driver's own steps take the quick timing where association time is not what is tested."""

import ast
import re
import time
from itertools import pairwise
from pathlib import Path

import pytest
from test_firmware import FAST, assert_contiguous, seqs_of, start_nodes, wait_until

from kinhbac import wire
from kinhbac.emulator import access_point, launcher
from kinhbac.emulator.access_point import WifiTiming
from kinhbac.emulator.board import DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, WDT_RESET
from kinhbac.emulator.receiver import Receiver
from kinhbac.firmware import config_file, firmware_files

REPO = Path(__file__).resolve().parents[1]
KIT = len(launcher.SENSOR_KIT)
DAY_MS = 86_400_000

# The field's settings, shortened: the watchdog at 2 s (a 15 s WiFi attempt is 7 of its
# timeouts; the field's 10 s makes it 1.5), safe mode after 2 bad boots (10 in the field, which
# the old firmware, reset by its watchdog in every attempt, reached in about two minutes of an
# outage) and the no-network reboot at 5 s (15 minutes in the field; neither mode uses it, and
# here the outage outlasts it too).
OUTAGE_SETTINGS = {"watchdog_ms": 2000, "safe_mode_after": 2, "no_network_reboot_s": 5}
# Claim mode: two whole WiFi attempts, claim_retry_ms apart, and part of a third, 20 watchdog
# timeouts. In the field, ten minutes are 13 attempts 30 s apart: the old firmware's first
# watchdog reset came in the first.
CLAIM_OUTAGE_S = 40
# Deep sleep: a cycle gives the link 3 x ack_timeout_ms (3 s here, 1.5 watchdog timeouts; the
# WiFi attempt is cut there), then sleeps. Eight cycles are ten minutes of a node that wakes
# every 75 s.
CYCLE_ACK_TIMEOUT_MS = 1000
OUTAGE_CYCLES = 8
# Two hours of the field's 15-minute no-network reboots: eight, one every 3 s here.
OUTAGE_REBOOTS = 8


@pytest.fixture
def receiver():
    with Receiver({}) as rx:
        yield rx


@pytest.fixture
def quick_wifi(emulator):
    emulator.access_point.wifi = WifiTiming.quick()


class ClaimingReceiver(Receiver):
    """The test receiver that also approves every CLAIM signed with the site's claim key, as
    the gateway answers a claim an admin approved: an IDENTITY under key id 7."""

    KEY_ID = 7

    def __init__(self, claim_key: str) -> None:
        super().__init__({})
        self.claim_key = claim_key.encode()
        self.approved: list[bytes] = []

    def _lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        if key_id == wire.CLAIM_KEY_ID:
            key = wire.Key(device_id, key_id, self.claim_key)
            self.keys.setdefault(device_id, key)  # _serve signs its answers with keys[device]
            return key
        return super()._lookup(device_id, key_id)

    def _handle(self, msg: wire.Message) -> list[tuple[str, object]]:
        if msg.type != wire.CLAIM:
            return super()._handle(msg)
        nonce = msg.nonce  # type: ignore[attr-defined]
        key = wire.Key(msg.device_id, self.KEY_ID,
                       wire.claim_secret(self.claim_key, msg.device_id, nonce))
        with self._lock:
            self.keys[msg.device_id] = key
            self.approved.append(msg.device_id)
        return [("identity", key)]

    @staticmethod
    def _encode(kind: str, key: wire.Key, boot: int, counter: int, payload: object) -> bytes:
        if kind == "identity":
            return wire.encode_identity(payload, boot, counter)
        return Receiver._encode(kind, key, boot, counter, payload)


# ----- the access point down for ten minutes (finding 2) -----


def test_claim_mode_with_the_access_point_down_for_ten_minutes_is_never_reset_and_then_claims(
        emulator, quick_wifi):
    ap = emulator.access_point
    board = emulator.add_board()
    claim_key = "k" * 32
    device = wire.device_hex(b"kb" + board.mac)
    with ClaimingReceiver(claim_key) as receiver:
        config = {
            "claim_key": claim_key,
            "wifi": {"ssid": ap.ssid, "password": ap.password},
            "gateway": {"host": "127.0.0.1", "port": receiver.port},
            "console_window_ms": 100,
            "claim_retry_ms": 1000,
            "good_after_ms": 600_000,  # not good within the outage: a reset would count
        } | OUTAGE_SETTINGS
        board.write_files(firmware_files() | config_file(config))
        emulator.access_point_up(False)
        board.power_on()
        time.sleep(CLAIM_OUTAGE_S)
        text = board.console.text()
        assert board.boots == [PWRON_RESET], text[-2000:]
        assert "SAFE MODE" not in text
        assert f"E kinhbac: WiFi: no access point with SSID '{ap.ssid}' in range" in text
        assert not receiver.approved
        emulator.access_point_up(True)
        # Once the WiFi is back it claims, is approved, restarts as itself and says HELLO.
        board.console.wait_for("claim approved", timeout=30)
        wait_until(lambda: receiver.devices[device].hello is not None, timeout=30,
                   what="the claimed node's HELLO")
    assert board.boots == [PWRON_RESET, HARD_RESET]  # the one reset is the claim's own
    assert "SAFE MODE" not in board.console.text()


def test_deep_sleep_mode_with_the_access_point_down_for_ten_minutes_keeps_its_readings(
        emulator, quick_wifi, receiver):
    started_ms = time.time() * 1000
    (node,) = start_nodes(emulator, receiver, deep_sleep_ms=300,
                          ack_timeout_ms=CYCLE_ACK_TIMEOUT_MS, **OUTAGE_SETTINGS)
    receiver.wait_for_count(3 * KIT, node.device)
    emulator.access_point_up(False)
    before = node.board.boots.count(DEEPSLEEP_RESET)
    wait_until(lambda: node.board.boots.count(DEEPSLEEP_RESET) >= before + OUTAGE_CYCLES,
               timeout=OUTAGE_CYCLES * 10, what=f"{OUTAGE_CYCLES} cycles without the WiFi")
    text = node.board.console.text()
    assert WDT_RESET not in node.board.boots, text[-2000:]
    assert "SAFE MODE" not in text
    assert "gateway not reached this cycle" in text
    wakes = node.board.boots.count(DEEPSLEEP_RESET)
    taken = (1 + wakes) * KIT  # a round at power-on and one at each wake, the outage's too
    emulator.access_point_up(True)
    wait_until(lambda: node.board.boots.count(DEEPSLEEP_RESET) >= wakes + 3,
               timeout=60, what="three cycles after the outage")
    wait_until(lambda: receiver.count(node.device) >= taken, timeout=30,
               what="every cycle's readings")
    ended_ms = time.time() * 1000
    readings = receiver.readings_of(node.device)
    assert {r.boot for r in readings} == {1}  # the outage's wakes continued the boot
    assert_contiguous([r.seq for r in readings])  # and lost nothing
    assert set(node.board.boots) == {PWRON_RESET, DEEPSLEEP_RESET}
    # Every wake took the boot's clock offset from RTC memory: Unix times throughout.
    assert not [r for r in readings if r.unsynced]
    assert all(started_ms - 1000 <= r.time_ms <= ended_ms + 1000 for r in readings)
    times = [r.time_ms for r in readings if r.sensor == 0]
    assert times == sorted(times)


# ----- a two-hour gateway outage (finding 9) -----


def test_readings_keep_their_unix_time_across_the_reboots_of_a_two_hour_gateway_outage(
        emulator, quick_wifi, receiver):
    started_ms = time.time() * 1000
    (node,) = start_nodes(emulator, receiver, no_network_reboot_s=3, good_after_ms=1000)
    wait_until(lambda: any(not r.pre_sync for r in receiver.readings_of(node.device)),
               what="readings of a synced clock")
    # The gateway's host goes off (the WiFi stays up): its session dies, and from then on its
    # SYNs go unanswered; each boot is rebooted 3 s after it began, its connect still waiting.
    emulator.access_point.absent_hosts.add("127.0.0.1")
    time.sleep(2 * access_point.PROBE_EVERY_S)  # the site's route to it knows it is off
    receiver.drop_connections()
    wait_until(lambda: node.board.boots.count(HARD_RESET) >= OUTAGE_REBOOTS, timeout=90,
               what=f"{OUTAGE_REBOOTS} no-network reboots")
    emulator.access_point.absent_hosts.discard("127.0.0.1")
    last_boot = len(node.board.boots)
    wait_until(lambda: seqs_of(receiver, node, last_boot), timeout=30,
               what="readings of the boot after the outage")
    for boot in range(1, last_boot):
        wait_until(lambda b=boot: seqs_of(receiver, node, b), timeout=30,
                   what=f"readings of boot {boot}")
    ended_ms = time.time() * 1000
    assert set(node.board.boots) == {PWRON_RESET, HARD_RESET}  # no watchdog reset among them
    readings = receiver.readings_of(node.device)
    assert not [r for r in readings if r.unsynced]  # every boot's readings have Unix times
    outage_boots = [r for r in readings if 1 < r.boot < last_boot]
    assert {r.boot for r in outage_boots} == set(range(2, last_boot))
    assert all(r.pre_sync for r in outage_boots)  # flagged: taken from the RTC, not a sync
    assert all(started_ms - 1000 <= r.time_ms <= ended_ms + 1000 for r in readings)
    times = [r.time_ms for r in readings if r.sensor == 0]  # (boot, seq) order
    steps = [b - a for a, b in pairwise(times)]
    # Time runs on across every reboot, never a jump; backwards only by the resolution of the
    # RTC's read (whole seconds on the emulated board; the ESP32 port gives microseconds).
    assert min(steps) > -1000 and max(steps) < 10_000, (min(steps), max(steps))


def firmware_defaults():
    """firmware/node/config.py's DEFAULTS, read as the literal it is."""
    tree = ast.parse((REPO / "firmware" / "node" / "config.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "DEFAULTS" for t in n.targets))
    return ast.literal_eval(node.value)


@pytest.mark.slow
def test_a_day_of_the_kits_readings_at_the_default_settings_is_held_on_flash_and_delivered(
        emulator, quick_wifi, receiver):
    defaults = firmware_defaults()
    day = DAY_MS // defaults["interval_ms"] * KIT  # 7,200 readings at a round a minute
    assert day <= defaults["flash_readings"]  # the old default of a round a second: 55 minutes
    # The buffer at its defaults (RAM ring, flash buffer and when it is written); only the
    # interval is shortened, so the day's rounds come in seconds.
    settings = {k: v for k, v in FAST.items() if not k.startswith("flash")} | {
        "interval_ms": 5, "log_level": 3}
    (node,) = start_nodes(emulator, receiver, **settings)
    receiver.wait_for_count(KIT, node.device)
    emulator.access_point_up(False)
    wait_until(lambda: last_taken(node) >= day, timeout=180, what="a day of readings taken")
    emulator.access_point_up(True)
    receiver.wait_for_count(day, node.device, timeout=180)
    wait_until(lambda: receiver.devices[node.device].connections >= 2, what="the second HELLO")
    readings = receiver.readings_of(node.device)
    assert {r.boot for r in readings} == {1}
    assert_contiguous([r.seq for r in readings])  # nothing dropped
    saved = re.findall(r"saved through seq (\d+)", node.board.console.text())
    assert max(map(int, saved)) >= day - defaults["ram_readings"]  # the day went to flash
    hello = receiver.devices[node.device].hello
    assert hello.drops[wire.DROP_BUFFER_FULL] == hello.drops[wire.DROP_STORAGE_ERROR] == 0
    assert node.board.boots == [PWRON_RESET]


def last_taken(node):
    """The seq of the node's newest reading, from its debug lines (0 before the first)."""
    return max(map(int, re.findall(r"took seq \d+\.\.(\d+)", node.board.console.text())),
               default=0)


# ----- a gateway that restarts now and then (finding 9) -----


def test_reconnects_after_gateway_blips_stay_quick_while_each_session_moves_readings(
        emulator, quick_wifi, receiver):
    # The field's backoff: 0.5 s doubled per failed session up to 60 s. The old link doubled
    # it at every session that ended, so its sixth reconnect after a blip waited 16-32 s.
    (node,) = start_nodes(emulator, receiver, backoff_min_ms=500, backoff_max_ms=60_000)
    receiver.wait_for_count(20, node.device)
    view = receiver.devices[node.device]
    waits = []
    for _ in range(6):
        sessions = view.connections
        receiver.drop_connections()  # a gateway restart: every session ends at once
        dropped = time.monotonic()
        wait_until(lambda s=sessions: view.connections > s, timeout=60, what="the reconnect")
        waits.append(time.monotonic() - dropped)
        receiver.wait_for_count(receiver.count(node.device) + 20, node.device)  # it moved
    assert max(waits) < 3, waits  # the backoff's first step (0.25-0.5 s) every time
    assert_contiguous([r.seq for r in receiver.readings_of(node.device)])
    assert node.board.boots == [PWRON_RESET]
