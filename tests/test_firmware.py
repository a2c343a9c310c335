"""The node firmware on emulated boards, against the test receiver (a gateway stand-in)."""

import re
import time

import pytest

from kinhbac import wire
from kinhbac.emulator import launcher
from kinhbac.emulator.access_point import WifiTiming
from kinhbac.emulator.board import DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, WDT_RESET
from kinhbac.emulator.interpreter import ESP32_FREE_AFTER_BOOT, esp32_heap_estimate
from kinhbac.firmware import long_lived_buffers
from kinhbac.emulator.receiver import Receiver
from kinhbac.transport.serial_link import connect

# Quick settings, so that minutes of a field node's life take seconds here.
FAST = {
    "interval_ms": 20,
    "console_window_ms": 100,
    "send_after_ms": 100,
    "ack_timeout_ms": 2000,
    "backoff_min_ms": 50,
    "backoff_max_ms": 500,
    "good_after_ms": 600000,
}
SENSORS_PER_ROUND = len(launcher.SENSOR_KIT)
FAST_BATCH_MAX = 20  # the firmware's default batch_max, which these tests keep


@pytest.fixture
def receiver():
    with Receiver({}) as rx:
        yield rx


def start_nodes(emulator, receiver, count=1, **overrides):
    settings = FAST | overrides
    nodes = [launcher.provision(emulator, receiver.port, **settings) for _ in range(count)]
    for node in nodes:
        receiver.keys[node.key.device_id] = node.key
        node.board.power_on()
    return nodes


def wait_until(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def seqs_of(receiver, node, boot):
    return [r.seq for r in receiver.readings_of(node.device) if r.boot == boot]


def assert_contiguous(seqs, first=1):
    assert seqs == list(range(first, first + len(seqs))), f"gaps in {seqs[:5]}..{seqs[-5:]}"


def console_numbers(node, pattern):
    return [int(m) for m in re.findall(pattern, node.board.console.text())]


def test_five_boards_deliver_every_reading_once_in_order_with_the_sensor_values(
        emulator, receiver):
    nodes = start_nodes(emulator, receiver, count=5)
    for i, node in enumerate(nodes):
        node.bme280.set(temperature_c=10.0 + i, humidity_rh=40.0 + i, pressure_pa=95000.0 + i)
        node.level.volts = 0.5 + i * 0.25
    for node in nodes:
        receiver.wait_for_count(200, node.device, timeout=60)
    for i, node in enumerate(nodes):
        view = receiver.devices[node.device]
        assert view.order_violations == 0
        readings = receiver.readings_of(node.device)
        assert_contiguous([r.seq for r in readings])
        assert {r.boot for r in readings} == {1}
        # Skip the first round: the test set the models while the node may have been sampling.
        steady = [r for r in readings if r.seq > 2 * SENSORS_PER_ROUND]
        by_sensor = {s: [r.value for r in steady if r.sensor == s] for s in range(5)}
        assert all(v == pytest.approx(10.0 + i, abs=0.01) for v in by_sensor[0])
        assert all(v == pytest.approx(40.0 + i, abs=0.01) for v in by_sensor[1])
        assert all(v == pytest.approx(95000.0 + i, abs=1.0) for v in by_sensor[2])
        assert all(v == pytest.approx((0.5 + i * 0.25) * 5 / 3.3, abs=0.002)
                   for v in by_sensor[3])
        assert view.hello.sensors == [(e["name"], e["unit"]) for e in launcher.SENSOR_KIT]
        assert view.hello.fw_version == "0.1.0"


def test_readings_taken_before_the_clock_sync_are_flagged_and_stamped(emulator, receiver):
    # Clock-sync flags, not WiFi timing: a 2.5 s association would make all 100 pre-sync.
    emulator.access_point.wifi = WifiTiming.quick()
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(100, node.device)
    readings = receiver.readings_of(node.device)
    assert readings[0].pre_sync  # taken during the console window, before any ACK
    assert not readings[-1].pre_sync
    assert not any(r.unsynced for r in readings)
    now_ms = time.time() * 1000
    assert all(now_ms - 60_000 < r.time_ms <= now_ms + 1000 for r in readings)
    times = [r.time_ms for r in readings if r.sensor == 0]
    assert times == sorted(times)


def test_readings_survive_an_access_point_outage(emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(50, node.device)
    emulator.access_point_up(False)
    time.sleep(3)  # ~150 rounds: more than RAM holds, so the buffer goes to flash
    during = receiver.count(node.device)
    emulator.access_point_up(True)
    receiver.wait_for_count(during + 600, node.device, timeout=60)
    assert_contiguous(seqs_of(receiver, node, 1))
    assert receiver.devices[node.device].order_violations == 0
    assert receiver.devices[node.device].connections >= 2


def test_power_cut_loses_at_most_the_readings_since_the_last_flash_write(emulator, receiver):
    flash_every = 32
    (node,) = start_nodes(emulator, receiver, log_level=3, flash_every=flash_every)
    receiver.wait_for_count(40, node.device)
    emulator.access_point_up(False)
    time.sleep(2)  # readings pile up; every flash_every of them go to flash
    node.board.power_cut(restore=False)
    taken = max(console_numbers(node, r"took seq \d+\.\.(\d+)"))
    saved = max(console_numbers(node, r"saved through seq (\d+)"))
    emulator.access_point_up(True)
    node.board.power_on()
    wait_until(lambda: seqs_of(receiver, node, 2), what="readings of the second boot")
    wait_until(lambda: max(seqs_of(receiver, node, 1)) >= saved, what="boot 1 up to the flush")
    first_boot = seqs_of(receiver, node, 1)
    assert_contiguous(first_boot)  # everything on flash arrived, nothing acked came back new
    lost = taken - max(first_boot)
    assert 0 <= lost < flash_every, (taken, saved, max(first_boot))
    assert node.board.boots == [PWRON_RESET, PWRON_RESET]
    assert receiver.devices[node.device].hello.boot == 2
    # Each boot-1 reading kept its identity: no value of boot 1 reappears under boot 2.
    times_1 = {(r.sensor, r.time_ms) for r in receiver.readings_of(node.device) if r.boot == 1}
    times_2 = {(r.sensor, r.time_ms) for r in receiver.readings_of(node.device) if r.boot == 2}
    assert not times_1 & times_2


def test_full_buffer_drops_the_oldest_and_reports_how_many(emulator, receiver):
    (node,) = start_nodes(emulator, receiver, ram_readings=16, flash_every=8,
                          flash_readings=64, log_level=3)
    emulator.access_point_up(False)
    time.sleep(2)  # ~500 readings for 80 places
    before = receiver.count(node.device)
    emulator.access_point_up(True)
    receiver.wait_for_count(before + 80 + 50, node.device)  # the survivors, then fresh ones
    node.board.power_cut(restore=False)
    dropped = receiver.devices[node.device].hello.drops[wire.DROP_BUFFER_FULL]
    assert dropped > 0  # ~500 readings for 80 places (fewer on a busy machine)
    boot_1 = seqs_of(receiver, node, 1)
    missing = set(range(1, max(boot_1) + 1)) - set(boot_1)
    # Every reading that never arrived was counted. The count can exceed them by readings that
    # were already on their way when their segment was dropped (at most the frames in flight).
    assert len(missing) <= dropped <= len(missing) + 4 * FAST_BATCH_MAX
    # The dropped ones are the oldest of the outage: what follows them arrived without a gap.
    assert_contiguous([s for s in boot_1 if s > max(missing)], first=max(missing) + 1)


def test_crash_loop_ends_in_safe_mode_that_sends_no_readings_and_says_why(emulator, receiver):
    node = launcher.provision(emulator, receiver.port, **(FAST | {"safe_mode_after": 3}))
    receiver.keys[node.key.device_id] = node.key
    # A file where the buffer's folder belongs: every start fails making the folder.
    node.board.write_files({"/buf": b"not a folder"})
    node.board.power_on()
    node.board.console.wait_for("SAFE MODE", timeout=30)
    node.board.console.wait_for("safe mode reported to the gateway")  # then it waits
    text = node.board.console.text()
    assert "3 boots in a row failed" in text and "OSError" in text
    assert node.board.boots == [PWRON_RESET] + [HARD_RESET] * 3
    assert receiver.count() == 0
    repl = connect(node.board.tty_path)  # Ctrl-C: a technician can look around
    assert "safe_reason" in repl.exec("print(open('/state.json').read())").decode()


def test_a_hung_main_loop_is_reset_by_the_watchdog(emulator, receiver):
    (node,) = start_nodes(emulator, receiver, watchdog_ms=1000)
    receiver.wait_for_count(20, node.device)
    node.board.stall_peripherals()  # the next sensor read never returns
    wait_until(lambda: WDT_RESET in node.board.boots, timeout=10, what="a watchdog reset")
    wait_until(lambda: seqs_of(receiver, node, 2), what="readings after the reset")
    assert node.board.boots[:2] == [PWRON_RESET, WDT_RESET]


def test_ctrl_c_in_the_console_window_keeps_the_watchdog_off(emulator, receiver):
    (node,) = start_nodes(emulator, receiver, console_window_ms=3000, watchdog_ms=1000)
    node.board.console.wait_for("Ctrl-C for the REPL")
    repl = connect(node.board.tty_path)
    repl.enter_raw_repl()
    time.sleep(2)  # longer than the watchdog timeout: it must not have been armed
    assert repl.exec("print('at the REPL')") == b"at the REPL\r\n"
    assert node.board.boots == [PWRON_RESET]


def test_config_frame_changes_the_interval_and_survives_a_power_cut(emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(20, node.device)
    receiver.pending_config[node.device] = {"interval_ms": 200}
    receiver.drop_connections()  # the CONFIG goes out on the next connection
    node.board.console.wait_for("CONFIG applied: interval_ms")
    time.sleep(1.5)
    node.board.power_cut()
    wait_until(lambda: len([r for r in receiver.readings_of(node.device)
                            if r.boot == 2 and r.sensor == 0]) >= 5, what="boot-2 readings")
    times = [r.time_ms for r in receiver.readings_of(node.device) if r.boot == 2 and r.sensor == 0]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    # The median, since a loaded machine can delay one round; the old interval was 20 ms.
    assert 180 <= gaps[len(gaps) // 2] <= 260, gaps
    node.board.power_cut(restore=False)
    saved = node.board.read_file("/config.json")
    assert b'"interval_ms": 200' in saved


def test_config_frame_with_an_unknown_setting_is_refused_and_reported(emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(10, node.device)
    receiver.pending_config[node.device] = {"wifi": {"ssid": "elsewhere"}}
    receiver.drop_connections()
    wait_until(lambda: receiver.config_errors, what="the node's ERROR answer")
    assert "wifi" in receiver.config_errors[0][1]
    count = receiver.count(node.device)
    receiver.wait_for_count(count + 20, node.device)  # still sending with its old settings


def test_no_network_for_too_long_reboots_the_node(emulator, receiver):
    # More than a boot needs to its first ACK (WiFi alone takes 2.5 s): at 2 s it rebooted for ever.
    (node,) = start_nodes(emulator, receiver, no_network_reboot_s=5)
    receiver.wait_for_count(10, node.device)
    emulator.access_point_up(False)
    wait_until(lambda: HARD_RESET in node.board.boots, timeout=15, what="a reboot")
    emulator.access_point_up(True)
    wait_until(lambda: seqs_of(receiver, node, 2), what="readings after the reboot")
    assert_contiguous(seqs_of(receiver, node, 1))  # nothing in RAM was lost by the reboot


def test_deep_sleep_mode_keeps_its_boot_and_counters_in_rtc_memory(emulator, receiver):
    (node,) = start_nodes(emulator, receiver, deep_sleep_ms=300)
    wait_until(lambda: node.board.boots.count(DEEPSLEEP_RESET) >= 3, what="three wakes")
    receiver.wait_for_count(4 * SENSORS_PER_ROUND, node.device)
    readings = receiver.readings_of(node.device)
    assert {r.boot for r in readings} == {1}  # a wake is not a new boot
    assert_contiguous([r.seq for r in readings])
    assert receiver.devices[node.device].connections >= 4


LIVE_HEAP = "(__import__('gc').collect(), __import__('gc').mem_alloc())[1]"


def heap_reports(node):
    pattern = r"heap alloc=(\d+) free=(\d+) readings=(\d+)"
    return [tuple(map(int, m)) for m in re.findall(pattern, node.board.console.text())]


def test_the_config_checks_and_table_rules_leave_the_heap_once_the_boot_used_them(
        emulator, receiver):
    # Both are loaded at boot (the config file is checked, its sensor table too) and needed
    # again only for a CONFIG frame: kept, their bytecode would hold about 10 KB of an
    # ESP32's heap for good (docs/firmware.md, "Heap").
    (held,) = start_nodes(emulator, receiver, console_window_ms=5000)
    held.board.console.wait_for("Ctrl-C for the REPL")
    repl = connect(held.board.tty_path)
    repl.enter_raw_repl()
    loaded = repl.eval("sorted(m for m in __import__('sys').modules if m.startswith('node'))")
    assert "node.app" in loaded and "node.sensors" in loaded, loaded
    assert "node.config" not in loaded and "node.table" not in loaded, loaded
    assert repl.eval("hasattr(__import__('node'), 'config')") is False


def test_ten_thousand_readings_fit_the_esp32_heap_and_the_live_heap_stays_flat(
        emulator, receiver):
    (node,) = start_nodes(emulator, receiver, interval_ms=5, log_level=3, batch_max=40)
    receiver.wait_for_count(4000, node.device, timeout=120)
    emulator.access_point_up(False)  # an outage in the middle: the buffer goes to flash
    time.sleep(2)
    emulator.access_point_up(True)
    receiver.wait_for_count(10_000, node.device, timeout=180)
    time.sleep(1.5)  # one more heap report
    assert node.board.boots == [PWRON_RESET]  # no MemoryError, no reset
    assert "MemoryError" not in node.board.console.text()
    assert_contiguous(seqs_of(receiver, node, 1))
    reports = heap_reports(node)
    warm = [alloc for alloc, _, taken in reports if 1000 <= taken < 3000]
    late = [alloc for alloc, _, taken in reports if taken >= 7000]
    assert warm and late, reports
    # The live heap after a collection: its high-water mark after warm-up does not grow.
    assert max(late) <= max(warm) + 1024, (warm, late)
    # Where the heap goes, for an estimate by kind: a board without firmware holds what the
    # interpreter and the stand-ins hold; a board stopped at its console window, that plus
    # the firmware's imports; the rest of the high-water is the firmware's running state.
    blank = emulator.add_board()
    blank.power_on()
    blank.console.wait_for(">>> ")
    baseline = connect(blank.tty_path).eval(LIVE_HEAP)
    (held,) = start_nodes(emulator, receiver, console_window_ms=5000, batch_max=40)
    held.board.console.wait_for("Ctrl-C for the REPL")
    repl = connect(held.board.tty_path)
    repl.enter_raw_repl()
    imports = repl.eval(LIVE_HEAP) - baseline
    high = max(alloc for alloc, _, _ in reports)
    firmware = high - baseline
    as_mpy, frozen = esp32_heap_estimate(
        imports, firmware - imports, long_lived_buffers({"batch_max": 40}))
    print(f"\nlive heap high-water {high} B, without firmware {baseline} B: the firmware holds "
          f"{firmware} B on the unix port ({imports} B of it its imports); on an ESP32, by "
          f"kind, about {as_mpy:.0f} B as .mpy files, {frozen:.0f} B as a frozen image")
    # The run itself is the fit check: the board's heap (HEAP_FACTOR) leaves the firmware the
    # room for garbage an ESP32 leaves it. The estimate must agree that the firmware fits an
    # ESP32's free heap, and a frozen image must meet issue 12's target.
    assert as_mpy < ESP32_FREE_AFTER_BOOT
    assert frozen < 48 * 1024
