"""The node through what a site does to it: its power cut while a technician writes its
config, deep sleep, the access point gone for a while. Every reading the node takes reaches the
host's broker, by (device, boot, seq), whatever came between."""

import json
import time

import pytest

from kinhbac import mqtt_contract
from kinhbac.device.board_session import BoardSession
from kinhbac.device.errors import BoardError
from kinhbac.firmware import CONFIG_PATH
from kinhbac.transport.raw_repl import TransportError

from .boards import SENSOR_KIT

ROUND = len(SENSOR_KIT)  # readings per sampling round: one per sensor
INTERVAL_S = 0.5  # NODE_SETTINGS' interval_ms


def _status(node) -> dict:
    topic = mqtt_contract.device_status_topic(mqtt_contract.DEFAULT_PREFIX, "hil", node.device)
    with node.site.collector.lock:
        return dict(node.site.collector.retained.get(topic) or {})


def _seqs(node, boot: int) -> list[int]:
    return sorted(seq for b, seq in node.readings() if b == boot)


def _missing(seqs: list[int]) -> list[int]:
    """The seqs of a boot that never arrived: its readings are numbered from 1."""
    return sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))


def _session(port: str, timeout: float = 30) -> BoardSession:
    """The technician's tool's session, once the port is back: a real board's USB port
    vanishes while its power is off."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return BoardSession(port)
        except BoardError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ----- the config under a power cut -----

# Padding in a config key the node ignores: a write of about a dozen of the raw REPL's 512-byte
# chunks, so that cuts land in it at several points.
NOTE_BYTES = 6000
# Where the power is cut: after these fractions of the bytes a whole write sends down the serial
# link (the same points on any link speed): at the first chunks, half-way, after the last chunk
# (the temporary file not yet closed and renamed), and in the close, rename and check.
CUT_AT = (0.1, 0.5, 0.9, 0.97)


class _PowerCut(TransportError):
    """What the tool meets when its board's USB port vanishes with the power."""


def _count_sent(session: BoardSession, cut_after: int | None = None, rig=None) -> list[int]:
    """Count the bytes the tool sends to the board; once `cut_after` have gone, the rig cuts
    the board's power and the link fails, as a real board's USB port does (an emulated
    board's pty would stay). Returns the running count, in a list."""
    link, write, sent = session.link, session.link.write, [0]

    def counted(data: bytes) -> int | None:
        if cut_after is not None and sent[0] >= cut_after:
            raise _PowerCut("the board's power is off")
        done = write(data)
        sent[0] += len(data)
        if cut_after is not None and sent[0] >= cut_after:
            rig.power_cut(restore=True)
            link.close()
            raise _PowerCut("the board's power is off")
        return done

    link.write = counted
    return sent


def test_a_power_cut_during_a_config_write_leaves_the_old_or_the_new_config(node, measure):
    """The technician's tool writes a temporary file and renames it over the config (a
    littlefs rename is atomic); the rig cuts the power at several points of the write. After
    each cut the board holds the whole old config or the whole new one, and the node runs."""
    board, rig = node.board, node.board.rig
    board.node_settings = None  # the suite's install no longer stands after this
    session = _session(board.port)  # closed by each cut, reopened after it
    try:
        session.stop_app(just_reset=False)  # the node's watchdog is armed: caught at reset
        old = session.repl.fs_get(CONFIG_PATH)
        base = json.loads(old)
        versions = [json.dumps(base | {"hil_note": f"version {n} " + "x" * NOTE_BYTES},
                               sort_keys=True).encode() for n in range(len(CUT_AT) + 1)]
        # How many bytes a whole write sends: where the cuts go.
        sent = _count_sent(session)
        started = time.monotonic()
        session.write_config(versions[0])
        whole = sent[0]
        measure("config_write", round(time.monotonic() - started, 2), "s",
                f"write_config of {len(versions[0])} bytes ({whole} over the serial link), "
                "temporary file and rename")
        old = versions[0]
        outcomes = []
        for at, new in zip(CUT_AT, versions[1:]):
            _count_sent(session, int(at * whole), rig)
            with pytest.raises((BoardError, TransportError)):
                session.write_config(new)
            session.close()
            session = _session(board.port)
            session.stop_app()  # powered on just now: caught in its console window
            landed = session.repl.fs_get(CONFIG_PATH)
            assert landed in (old, new), (
                f"cut {at:.0%} into the write: the config is neither the old one nor the new "
                f"one ({len(landed)} bytes: {landed[:80]!r} ... {landed[-80:]!r})")
            assert json.loads(landed)["device_id"] == node.device
            outcomes.append("new" if landed == new else "old")
            old = landed
        # Back to the config the suite installed; then the node must run on it.
        session.write_config(json.dumps(base, sort_keys=True).encode())
        session.reset()
    finally:
        session.close()
    node.wait_readings(2 * ROUND, timeout=60, what=f"{board.name}'s readings after the cuts")
    measure("config_cuts", " ".join(outcomes), "",
            "what each power cut left: the old config or the new one")


# ----- deep sleep -----

SLEEP_MS = 1000
CYCLES = 4  # wakes to watch: each is a DEEPSLEEP reset that continues the boot


@pytest.mark.node_settings(deep_sleep_ms=SLEEP_MS)
def test_deep_sleep_wakes_continue_the_boot_from_rtc_memory(node, measure):
    """In battery mode each cycle reads once, sends, and deep-sleeps; the wake is a
    DEEPSLEEP reset, not a new boot: RTC memory carries the boot, the next seq, the uplink
    counter (the gateway drops a frame whose counter is not new) and the pulse totals. The
    ESP32 port counts no pulses while asleep (Pin.irq is no wake source and the CPU is off),
    so the meter's total rises by what came while awake, and never goes back."""
    rig = node.board.rig
    boot = max(b for b, _ in node.readings())
    try:
        rig.set_pulse_rate(20)
        no_pulses = None
    except pytest.skip.Exception as missing:  # the rest holds without a pulse source
        no_pulses = str(missing)
    waited = time.monotonic()
    node.wait_readings(CYCLES * ROUND, timeout=CYCLES * (SLEEP_MS / 1000 + 15),
                       what=f"{CYCLES} cycles of {node.board.name}")
    if no_pulses is None:
        rig.set_pulse_rate(0)
    cycle_s = (time.monotonic() - waited) / CYCLES
    node.site.collector.wait_for(lambda: _status(node).get("reset_cause") == "DEEP_SLEEP", 30,
                                 "a HELLO after a wake")
    status = _status(node)
    assert status["boot"] == boot, status  # a wake is not a new boot
    readings = node.readings()
    assert {b for b, _ in readings} >= {boot}
    seqs = _seqs(node, boot)
    assert len(seqs) >= (CYCLES + 1) * ROUND
    assert not _missing(seqs), _missing(seqs)  # seq and uplink counter carried over the sleeps
    measure("deep_sleep_cycle", round(cycle_s, 2), "s",
            f"one read-send-sleep cycle with deep_sleep_ms={SLEEP_MS}")
    water = [r["value"] for (b, _), r in sorted(readings.items())
             if b == boot and r["sensor"] == "water"]
    assert water == sorted(water), water  # a running total never goes back over a sleep
    if no_pulses is not None:
        pytest.skip(f"boot, seq and counter held over {CYCLES} wakes; the pulse totals "
                    f"were not checked: {no_pulses}")
    counted = (water[-1] - water[0]) / 0.5
    assert counted > 0, water  # pulses counted while awake are kept across the sleeps
    sent = rig.pulses_sent()
    if sent is not None:
        assert counted <= sent, (counted, sent)


@pytest.mark.node_settings(deep_sleep_ms=SLEEP_MS)
def test_a_power_cut_in_battery_mode_starts_a_new_boot(node):
    """RTC memory does not outlive a power cut: the next start is a new boot (its seqs from
    1), counted on flash, and what the old boot took is all in."""
    boot = max(b for b, _ in node.readings())
    node.board.rig.power_cut(restore=True)
    node.site.collector.wait_for(lambda: any(b > boot for b, _ in node.readings()), 90,
                                 f"{node.board.name}'s readings of its next boot")
    node.wait_readings(2 * ROUND, timeout=60)
    assert {b for b, _ in node.readings() if b > boot} == {boot + 1}
    node.site.collector.wait_for(lambda: _status(node).get("boot") == boot + 1, 30,
                                 "the status of the next boot")
    assert not _missing(_seqs(node, boot + 1))
    # The old boot saved to flash before each sleep: no gap in it (a cut while awake may
    # lose that cycle's last round, never acknowledged, which no gap shows).
    assert not _missing(_seqs(node, boot))


# ----- the access point down, then back -----

OUTAGE_S = 6.0  # a dozen sampling rounds, a dozen send intervals


def test_readings_taken_while_the_access_point_is_down_all_reach_the_broker(node, measure):
    """The node keeps sampling with its gateway out of reach and delivers every reading of
    the outage once the access point is back: nothing missing by (device, boot, seq)."""
    rig = node.board.rig
    boot = max(b for b, _ in node.readings())
    rig.access_point(False)
    down_ms = time.time() * 1000
    try:
        time.sleep(OUTAGE_S)
    finally:
        rig.access_point(True)
    up_ms = time.time() * 1000
    up = time.monotonic()

    def delivered() -> bool:
        # Everything taken until the access point came back, and nothing missing before it
        # (readings carry the node's clock, set from the gateway's: the host's time).
        readings = node.readings()
        seqs = sorted(s for b, s in readings if b == boot)
        return not _missing(seqs) and (readings[(boot, seqs[-1])]["ts"] or 0) >= up_ms

    try:
        node.site.collector.wait_for(delivered, 90, f"{node.board.name}'s backlog")
    except TimeoutError:
        pass  # the asserts below say what never came
    backlog_s = time.monotonic() - up
    missing = _missing(_seqs(node, boot))
    assert not missing, (f"{len(missing)} readings of boot {boot} never reached the broker, "
                         f"seqs {missing[:10]} ... {missing[-10:]}")
    assert delivered(), "the readings taken as the access point came back never came in"
    readings = node.readings()
    during = [r for (b, _), r in readings.items()
              if b == boot and r["ts"] is not None and down_ms + 1000 <= r["ts"] <= up_ms]
    # The node sampled on through the outage, and those readings came in after it.
    rounds = (OUTAGE_S - 1) / INTERVAL_S
    assert len(during) >= 0.8 * rounds * ROUND, (len(during), rounds)
    measure("backlog_delivery", round(backlog_s, 2), "s",
            f"from the access point back until all of a {OUTAGE_S:.0f} s outage's "
            f"{len(during)} readings were in")


def test_readings_reach_the_hosts_gateway_with_none_missing(node, measure):
    """End to end: the node's readings through the WiFi, the host's gateway (which checks
    each frame's MAC and counter) and its broker, every one of a period, on time."""
    boot = max(b for b, _ in node.readings())
    first = max(_seqs(node, boot))
    started = time.monotonic()
    node.wait_readings(20 * ROUND, timeout=60)
    elapsed = time.monotonic() - started
    seqs = [s for s in _seqs(node, boot) if s > first]
    assert not _missing(_seqs(node, boot))
    assert not node.site.collector.outside_contract, node.site.collector.outside_contract
    now_ms = time.time() * 1000
    newest = node.readings()[(boot, max(seqs))]
    # Sent within send_after_ms of being taken: the newest is less than a few rounds old.
    assert newest["ts"] is not None and now_ms - newest["ts"] < 5000, (now_ms, newest)
    measure("readings_rate", round(len(seqs) / elapsed, 1), "readings/s",
            f"at interval_ms={INTERVAL_S * 1000:.0f}, {ROUND} sensors")
