"""The emulated boards' hardware as the ESP32 port and ESP-IDF define it (issue 12), each run in
the real micropython binary through the stand-ins: the ADC's curve, ADC2 under WiFi, the missing
pulls of GPIO34-39, the scheduler's queue of 8, I2C timeouts, the RTC, the ticks wrap at 2**30
and the CPU stall of a flash erase. Sources and figures: docs/emulator.md, "Emulated vs real
ESP32"."""

import threading
import time
from itertools import pairwise

import pytest
from test_emulator import WIFI, boot_with
from test_firmware import FAST, assert_contiguous, wait_until

from kinhbac.emulator import launcher
from kinhbac.emulator.access_point import WifiTiming
from kinhbac.emulator.board import DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, SOFT_RESET
from kinhbac.emulator.devices import BME280, AnalogSource, PulseSource, calibrated_mv
from kinhbac.emulator.receiver import Receiver
from kinhbac.transport.raw_repl import RemoteError
from kinhbac.transport.serial_link import connect

TICKS_PERIOD = 1 << 30  # MICROPY_PY_TIME_TICKS_PERIOD on the 32-bit ESP32
LOST = "__import__('_hw').lost_irqs"


def adc_repl(board, pin, volts, atten=3):
    source = AnalogSource(volts=volts)
    board.attach_analog(pin, source)
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec(f"import machine\nadc = machine.ADC(machine.Pin({pin}), atten={atten})")
    return repl, source


# ----- ADC ----------------------------------------------------------------------------------


def test_adc_at_11_db_reads_the_esp32_curve_and_saturates_near_3_1_v(board):
    repl, source = adc_repl(board, 34, 1.0)
    read = {}
    for volts in (0.05, 0.15, 0.5, 1.0, 2.0, 2.45, 2.6, 2.8, 3.0, 3.2, 3.3):
        source.volts = volts
        read[volts] = repl.eval("(adc.read(), adc.read_u16(), adc.read_uv())")
    # Below the calibration's offset (142 mV on ADC1 at 11 dB) the converter reads 0, and the
    # calibrated value of code 0 is that offset.
    assert read[0.05][0] == 0 and read[0.05][2] == 142_000
    # In the usable range read_uv() gives the input back to the millivolt.
    for volts in (0.15, 0.5, 1.0, 2.0, 2.45, 2.6, 2.8, 3.0):
        assert read[volts][2] == pytest.approx(volts * 1e6, abs=1000), volts
    # Raw codes are not linear in the input: the line through 0.5 and 2.0 V misses the codes
    # above the knee (2.45 V) by hundreds, where ESP-IDF switches to its lookup table.
    (r1, _, _), (r2, _, _) = read[0.5], read[2.0]
    per_volt = (r2 - r1) / 1.5
    assert abs(read[1.0][0] - (r1 + 0.5 * per_volt)) < 3
    assert read[3.0][0] - (r1 + 2.5 * per_volt) > 200
    # From about 3.13 V it saturates: 4095, and the same calibrated value whatever the input.
    assert read[3.2][0] == read[3.3][0] == 4095
    assert read[3.2][2] == read[3.3][2] == calibrated_mv(4095, 3) * 1000 == 3_134_000
    for raw, u16, _ in read.values():
        assert u16 == (raw << 4) | (raw >> 8)  # the port's bit replication


def test_adc_at_0_db_saturates_at_its_calibrated_top_not_1_1_v(board):
    repl, _ = adc_repl(board, 35, 2.0, atten=0)
    assert repl.eval("(adc.read(), adc.read_uv())") == (4095, 1_039_000)


def test_adc2_pin_fails_with_the_ports_timeout_error_while_wifi_is_on(board):
    source = AnalogSource(volts=1.0)
    board.attach_analog(25, source)  # ADC2, channel 8
    board.attach_analog(34, AnalogSource(volts=0.5))  # ADC1
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec("import machine\nadc2 = machine.ADC(machine.Pin(25), atten=3)\n"
              "adc1 = machine.ADC(machine.Pin(34), atten=3)")
    assert repl.eval("adc2.read_uv()") == pytest.approx(1_000_000, abs=1000)
    repl.exec(WIFI)
    # ESP-IDF's adc2_get_raw() returns ESP_ERR_TIMEOUT while WiFi holds ADC2; the port's
    # check_esp_err() raises it as OSError(ETIMEDOUT, "ESP_ERR_TIMEOUT").
    for call in ("read", "read_u16", "read_uv"):
        assert repl.exec(
            "import errno\n"
            f"try:\n    adc2.{call}()\nexcept OSError as e:\n"
            "    print(e.errno == errno.ETIMEDOUT, e.args[1])\n"
        ) == b"True ESP_ERR_TIMEOUT\r\n"
    assert repl.eval("adc1.read_uv()") == pytest.approx(500_000, abs=1000)


# ----- pins ---------------------------------------------------------------------------------


def test_pull_on_gpio34_to_39_is_ignored_and_the_undriven_pin_floats(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec("import machine\nP = machine.Pin\n"
              "up36 = P(36, P.IN, P.PULL_UP)\nup26 = P(26, P.IN, P.PULL_UP)\n"
              "down25 = P(25, P.IN, P.PULL_DOWN)\n")
    floating = repl.eval("[up36.value() for _ in range(200)]")
    assert set(floating) == {0, 1}  # neither the pull's level nor any one level
    assert set(repl.eval("[up26.value() for _ in range(50)]")) == {1}
    assert set(repl.eval("[down25.value() for _ in range(50)]")) == {0}
    board.drive_pin(36, 1)  # an external pull-up resistor, or a sensor's output
    wait_until(lambda: repl.eval("up36.value()") == 1, timeout=5, what="the driven level")
    assert set(repl.eval("[up36.value() for _ in range(50)]")) == {1}


ARM_COUNTER = (
    "import machine, time, _hw\n"
    "count = 0\n"
    "def on_edge(pin):\n"
    "    global count\n"
    "    count += 1\n"
    "pin = machine.Pin(27, machine.Pin.IN, machine.Pin.PULL_UP)\n"
    "pin.irq(on_edge, trigger=machine.Pin.IRQ_FALLING)\n"
)


def test_scheduler_queue_keeps_eight_edges_and_counts_the_rest_as_lost(board):
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    mark = boot_with(board, ARM_COUNTER + (
        "l0 = _hw.lost_irqs\n"
        "print('blocking')\n"
        "time.sleep_us(1_500_000)\n"  # C code: no handler runs until it returns
        "print('after', count, _hw.lost_irqs - l0)\n"
    ), "blocking")
    time.sleep(0.3)
    meter.pulses(20)
    board.console.wait_for("after", since=mark, timeout=10)
    board.console.wait_for(">>> ", since=mark)
    repl = connect(board.tty_path)
    assert repl.eval("(count, _hw.lost_irqs - l0)") == (8, 12)


def test_pin_handlers_run_while_the_firmware_waits_in_asyncio(board):
    # The unix port runs scheduled handlers only when its poll() returns; the ESP32 runs them
    # while it waits. With asyncio asleep for a second at a time, 200 edges a second would
    # overflow the queue of 8 at once if the emulated board did not wake for them.
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    mark = boot_with(board, ARM_COUNTER + (
        "import asyncio\n"
        "async def wait():\n"
        "    t0 = time.ticks_ms()\n"
        "    print('waiting')\n"
        "    while count + _hw.lost_irqs < 400 and time.ticks_diff(time.ticks_ms(), t0) < 8000:\n"
        "        await asyncio.sleep_ms(1000)\n"
        "asyncio.run(wait())\n"
        "print('done', count, _hw.lost_irqs)\n"
    ), "waiting")
    meter.start(200, count=400)
    board.console.wait_for("done", since=mark, timeout=15)
    board.console.wait_for(">>> ", since=mark)
    counted, lost = connect(board.tty_path).eval("(count, _hw.lost_irqs)")
    assert counted + lost == meter.emitted == 400
    assert lost <= 20, f"{lost} of 400 edges lost while asyncio waited"


# ----- I2C ----------------------------------------------------------------------------------


def test_i2c_device_holding_the_bus_fails_with_etimedout_after_the_ports_timeout(board):
    board.attach_i2c(BME280(0x76))
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec(
        "import machine, time, errno\n"
        "hw = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21))\n"
        "quick = machine.I2C(1, scl=machine.Pin(25), sda=machine.Pin(26), timeout=5000)\n"
        "soft = machine.SoftI2C(machine.Pin(18), machine.Pin(19))\n"
        "def held(bus):\n"
        "    t0 = time.ticks_us()\n"
        "    try:\n"
        "        bus.readfrom_mem(0x76, 0xD0, 1)\n"
        "    except OSError as e:\n"
        "        return e.errno == errno.ETIMEDOUT, time.ticks_diff(time.ticks_us(), t0)\n"
        "    return 'read', time.ticks_diff(time.ticks_us(), t0)\n"
    )
    assert repl.eval("hw.readfrom_mem(0x76, 0xD0, 1)") == b"\x60"
    board.stall_peripherals()
    time.sleep(0.1)  # the emulator has taken it in
    # The hardware bus: the port's 50 ms `timeout`, clamped to the 20-bit timeout register
    # (1,048,575 APB cycles: 13.1 ms); timeout=5000 gives 5 ms. SoftI2C waits its full 50 ms.
    # The first transaction of readfrom_mem (the register address) is the one that fails.
    ok, hw_us = repl.eval("held(hw)")
    assert ok is True and 13_100 <= hw_us < 13_100 + 30_000
    ok, quick_us = repl.eval("held(quick)")
    assert ok is True and 5_000 <= quick_us < hw_us
    ok, soft_us = repl.eval("held(soft)")
    assert ok is True and 50_000 <= soft_us < 50_000 + 30_000
    assert repl.eval("hw.scan()") == []  # every address times out: nothing answers


# ----- RTC ----------------------------------------------------------------------------------


def test_rtc_starts_at_2000_keeps_time_across_resets_and_is_lost_at_power_cut(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec("import machine, time\nrtc = machine.RTC()")
    assert repl.eval("rtc.datetime()[:7]")[:3] == (2000, 1, 1)
    assert repl.eval("rtc.datetime()[3]") == 5  # 2000-01-01 was a Saturday (Monday is 0)
    now = repl.eval("time.time()")
    assert isinstance(now, int) and 0 <= now < 30  # seconds since 2000: the port's epoch
    assert repl.eval("time.localtime()")[:3] == (2000, 1, 1)

    repl.exec("rtc.datetime((2026, 3, 1, 6, 12, 30, 0, 0))")
    assert repl.eval("time.localtime()")[:5] == (2026, 3, 1, 12, 30)
    assert repl.eval("time.time() - time.mktime((2026, 3, 1, 12, 30, 0, 0, 0))") in (0, 1)
    assert repl.eval("time.gmtime(0)") == (2000, 1, 1, 0, 0, 0, 5, 1)

    def datetime_after(reset, cause):
        mark = board.console.mark()
        reset()
        if cause == SOFT_RESET:
            mark = board.console.wait_for("soft reboot", since=mark, timeout=15)
        board.console.wait_for(">>> ", since=mark, timeout=15)
        assert board.boots[-1] == cause
        r = connect(board.tty_path)
        return r.eval("__import__('machine').RTC().datetime()")

    def machine_reset():
        r = connect(board.tty_path)
        r.enter_raw_repl()
        r.link.write(b"import machine\nmachine.reset()\x04")

    def deep_sleep():
        r = connect(board.tty_path)
        r.enter_raw_repl()
        r.link.write(b"import machine\nmachine.deepsleep(200)\x04")

    def soft_reset():
        r = connect(board.tty_path)
        r.link.write(b"\r\x02\x04")  # friendly REPL, then Ctrl-D

    for reset, cause in ((machine_reset, HARD_RESET), (deep_sleep, DEEPSLEEP_RESET),
                         (soft_reset, SOFT_RESET)):
        dt = datetime_after(reset, cause)
        assert dt[:6] == (2026, 3, 1, 6, 12, 30) or dt[:5] == (2026, 3, 1, 6, 12), (cause, dt)
    dt = datetime_after(board.power_cut, PWRON_RESET)
    assert dt[:3] == (2000, 1, 1)


# ----- ticks --------------------------------------------------------------------------------


def test_ticks_wrap_at_2_30_mid_session_and_ticks_diff_spans_the_wrap(board):
    board.ticks_start_ms = TICKS_PERIOD - 1500
    mark = boot_with(board, (
        "import time, asyncio\n"
        "t0 = time.ticks_ms()\n"
        "u0 = time.ticks_us()\n"
        "late = time.ticks_add(t0, 2000)\n"
        "print('started', t0)\n"
        "async def over_the_wrap():\n"
        "    await asyncio.sleep_ms(2000)\n"
        "asyncio.run(over_the_wrap())\n"
        "t1 = time.ticks_ms()\n"
        "print('after', t1, time.ticks_diff(t1, t0), time.ticks_diff(t1, late))\n"
    ), "after")
    board.console.wait_for(">>> ", since=mark)
    repl = connect(board.tty_path)
    t0, t1, late = repl.eval("(t0, t1, late)")
    assert TICKS_PERIOD - 1500 <= t0 < TICKS_PERIOD  # just below the wrap at boot
    assert t1 < t0 and late < 2000  # past it: the counter started again from 0
    assert 2000 <= repl.eval("time.ticks_diff(t1, t0)") < 2600
    assert repl.eval("time.ticks_diff(t0, t1)") < 0
    assert repl.eval("time.ticks_diff(t1, late)") >= 0  # the deadline across the wrap passed
    assert repl.eval("time.ticks_diff(time.ticks_add(t0, 2000), t0)") == 2000
    with pytest.raises(RemoteError, match="ticks interval overflow"):
        repl.exec(f"time.ticks_add(t0, {TICKS_PERIOD // 2})")
    us, cpu = repl.eval("(time.ticks_us(), time.ticks_cpu())")
    assert 0 <= us < TICKS_PERIOD and 0 <= cpu < TICKS_PERIOD
    # 2**30 is a small int on the ESP32 only up to 2**30 - 1: every ticks value stays below.
    assert repl.eval("max(time.ticks_ms(), time.ticks_us(), time.ticks_cpu())") < TICKS_PERIOD


@pytest.mark.slow
def test_a_node_keeps_sending_readings_across_the_ticks_wrap(emulator):
    emulator.access_point.wifi = WifiTiming.quick()  # a session well before the wrap
    with Receiver({}) as receiver:
        node = launcher.provision(emulator, receiver.port, **FAST)
        receiver.keys[node.key.device_id] = node.key
        node.board.ticks_start_ms = TICKS_PERIOD - 6000  # the wrap comes 6 s into the boot
        booted = time.monotonic()
        booted_ms = time.time() * 1000
        node.board.power_on()
        receiver.wait_for_count(50, node.device)
        # The board's ticks reach 2**30 no sooner than 6 s after power-on: mid-session.
        assert time.monotonic() - booted < 6
        wait_until(lambda: time.monotonic() - booted > 10, timeout=20, what="well past the wrap")
        before = receiver.count(node.device)
        receiver.wait_for_count(before + 100, node.device, timeout=30)
        ended_ms = time.time() * 1000
    readings = receiver.readings_of(node.device)
    assert_contiguous(sorted({r.seq for r in readings}))
    assert {r.boot for r in readings} == {1}
    assert receiver.devices[node.device].connections == 1  # one session, across the wrap
    # Every reading has its Unix time: no jump of 2**30 ms (12.4 days) either way at the wrap.
    assert not [r for r in readings if r.unsynced]
    assert all(booted_ms - 1000 <= r.time_ms <= ended_ms + 1000 for r in readings)
    times = [r.time_ms for r in sorted(readings, key=lambda r: r.seq) if r.sensor == 0]
    assert all(0 <= b - a < 2000 for a, b in pairwise(times)), times  # a round each 20 ms
    assert min(times) < booted_ms + 6000  # taken before the wrap ...
    assert max(times) > booted_ms + 9000  # ... and after it (the board starts within 3 s)
    text = node.board.console.text()
    assert "Traceback" not in text and "SAFE MODE" not in text
    assert node.board.boots == [PWRON_RESET]


# ----- flash --------------------------------------------------------------------------------


def test_flash_erase_stalls_the_cpu_and_each_pin_keeps_one_edge(board):
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec(ARM_COUNTER + "import esp32\nota = esp32.Partition('ota_1')\n")
    # One 4 KiB sector: the W25Q32JV's typical 45 ms.
    us = repl.eval("(lambda t0: (ota.ioctl(6, 0), time.ticks_diff(time.ticks_us(), t0))[1])"
                   "(time.ticks_us())")
    assert 45_000 <= us < 45_000 + 30_000
    # Eight sectors (360 ms) while a meter gives 10 pulses: the cache is off, the GPIO
    # interrupt waits and its status bit holds one edge; the other nine are lost.
    repl.exec("count = 0\nl0 = _hw.lost_irqs")
    worker = threading.Thread(target=repl.exec, args=(
        "ota.writeblocks(0, bytearray(8 * 4096))\nerased = time.ticks_ms()\n",))
    worker.start()
    time.sleep(0.1)
    meter.pulses(10)
    worker.join(timeout=10)
    assert repl.eval("(count, _hw.lost_irqs - l0)") == (1, 9)
