"""The node's sensor drivers (firmware/node/sensors.py), run on emulated boards."""

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers.gateway import GatewayProcess
from helpers.micropython import find_mpy_cross
from test_firmware import FAST, wait_until

from kinhbac import wire
from kinhbac.emulator import launcher
from kinhbac.emulator.board import PWRON_RESET
from kinhbac.emulator.devices import BME280, AnalogSource, Calibration, I2CDevice, PulseSource
from kinhbac.emulator.interpreter import HEAP_FACTOR, STANDIN_ALLOWANCE_BYTES
from kinhbac.emulator.receiver import Receiver
from kinhbac.transport.raw_repl import RemoteError
from kinhbac.transport.serial_link import connect

NODE = Path(__file__).resolve().parents[1] / "firmware" / "node"

# Precision of the driver's float compensation against the model's integer oracle (datasheet
# int32/int64 code) at the driver's default oversampling (T x1, P x4, H x1). Worst cases over
# the grid below, both calibrations: 0.0023 C, 0.36 Pa, 0.0054 %RH here (this port's floats
# are doubles); the same operations in float32, as on the ESP32: 0.0022 C, 0.37 Pa, 0.0053 %RH.
TEMPERATURE_TOL_C = 0.01
PRESSURE_TOL_PA = 1.0
HUMIDITY_TOL_RH = 0.01

# A calibration unlike the default: dig_H4 and dig_H5 both with nonzero low nibbles (they share
# 0xE5), a negative dig_H5 (sign extension from 0xE6), negative dig_H6, nonzero dig_H3.
ODD_CALIBRATION = Calibration(
    dig_T1=28485, dig_T2=26735, dig_T3=50,
    dig_P1=37734, dig_P2=-10593, dig_P3=3024, dig_P4=7614, dig_P5=-152, dig_P6=-7,
    dig_P7=9900, dig_P8=-10230, dig_P9=4285,
    dig_H1=75, dig_H2=352, dig_H3=7, dig_H4=289, dig_H5=-35, dig_H6=-30,
)

I2C_SETUP = "import machine\ni2c = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21))\n"


def boot_node(board, compiled=False):
    """Flash firmware/node/*.py to /lib/node/, boot, and return a raw-REPL session.

    compiled: flash sensors.mpy (and table.mpy) from mpy-cross instead of the sources. The
    node image freezes the package (firmware/manifest.py), so a real node never compiles
    sensors.py on its heap; compiling on the board needs more heap at once than the driver
    ever uses afterwards.
    """
    if compiled:
        files = {}
        # the package (its forget()), the driver, the rules it checks, its log
        for name in ("__init__", "sensors", "table", "log"):
            mpy = board.workdir / f"{name}.mpy"
            subprocess.run([find_mpy_cross(), "-o", str(mpy), str(NODE / f"{name}.py")],
                           check=True)
            files[f"lib/node/{name}.mpy"] = mpy.read_bytes()
    else:
        files = {f"lib/node/{p.name}": p.read_bytes() for p in sorted(NODE.glob("*.py"))}
    files["main.py"] = b"pass\n"
    board.write_files(files)
    board.power_on()
    board.console.wait_for(">>> ", timeout=15)
    repl = connect(board.tty_path)
    repl.exec("from node import sensors\n" + I2C_SETUP)
    return repl


class Unpluggable(BME280):
    """A BME280 whose connector can be pulled: while unplugged it NACKs like an absent chip."""

    def __init__(self, *args, **kwargs):
        self.plugged = True
        self.forced_starts = 0
        super().__init__(*args, **kwargs)

    def write(self, data):
        self._check()
        super().write(data)

    def read(self, n):
        self._check()
        return super().read(n)

    def _check(self):
        if not self.plugged:
            raise OSError(19, "unplugged")  # the board sees ENODEV, as for a NACK

    def _write_register(self, reg, value):
        if reg == 0xF4 and value & 0x03 in (1, 2):
            self.forced_starts += 1
        super()._write_register(reg, value)


class NotABme280(I2CDevice):
    """Some other chip at 0x76: a BMP280 answers chip id 0x58."""

    def _read_register(self, reg):
        return 0x58 if reg == 0xD0 else 0


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(NODE.glob("sensors.py")), ids=lambda p: p.name)
def test_sensor_driver_compiles_with_mpy_cross(source, tmp_path):
    out = tmp_path / "x.mpy"
    result = subprocess.run([find_mpy_cross(), "-o", str(out), str(source)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# BME280
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("calibration", [None, ODD_CALIBRATION], ids=["default-cal", "odd-cal"])
def test_bme280_reports_the_air_the_model_is_set_to_across_its_range(board, calibration):
    chip = BME280(0x76) if calibration is None else BME280(0x76, calibration=calibration)
    board.attach_i2c(chip)
    repl = boot_node(board)
    repl.exec("b = sensors.BME280(i2c, 0x76)")
    worst = [0.0, 0.0, 0.0]
    for t in (-40.0, -12.34, 0.0, 21.5, 35.7, 85.0):
        for p in (30000.0, 70000.25, 95000.5, 101325.0, 110000.0):
            for h in (0.0, 12.5, 50.0, 99.9, 100.0):
                chip.set(temperature_c=t, pressure_pa=p, humidity_rh=h)  # between reads
                got = repl.eval("b.measure() or (b.temperature, b.pressure, b.humidity)")
                for i, (value, want) in enumerate(zip(got, (t, p, h))):
                    worst[i] = max(worst[i], abs(value - want))
    assert worst[0] <= TEMPERATURE_TOL_C
    assert worst[1] <= PRESSURE_TOL_PA
    assert worst[2] <= HUMIDITY_TOL_RH


def test_bme280_absent_from_its_address_raises_oserror_naming_the_address(board):
    board.attach_i2c(BME280(0x76))  # the chip is at 0x76; the config says 0x77
    repl = boot_node(board)
    with pytest.raises(RemoteError, match="no BME280 at I2C address 0x77"):
        repl.exec("sensors.BME280(i2c, 0x77).measure()")


def test_another_chip_at_the_address_is_refused_by_its_chip_id(board):
    board.attach_i2c(NotABme280(0x76))
    repl = boot_node(board)
    with pytest.raises(RemoteError, match="chip id 0x58 at I2C address 0x76 is not a BME280"):
        repl.exec("sensors.BME280(i2c, 0x76).measure()")


def test_bme280_that_never_finishes_measuring_times_out_instead_of_hanging(board):
    chip = BME280(0x76)
    board.attach_i2c(chip)
    repl = boot_node(board)
    repl.exec("b = sensors.BME280(i2c, 0x76)\nb.measure()")
    chip.busy_reads = 10**9  # the next forced measurement never completes
    started = time.monotonic()
    with pytest.raises(RemoteError, match="stays busy"):
        repl.exec("b.measure()", timeout=10)
    assert time.monotonic() - started < 2.0
    assert repl.eval("b.valid") is False


def test_bme280_unplugged_and_replugged_measures_again(board):
    chip = Unpluggable(0x76)
    board.attach_i2c(chip)
    repl = boot_node(board)
    repl.exec("b = sensors.BME280(i2c, 0x76)\nb.measure()")
    chip.plugged = False
    with pytest.raises(RemoteError, match="OSError"):
        repl.exec("b.measure()")
    chip.plugged = True
    chip.set(temperature_c=30.0)
    repl.exec("b.measure()")
    assert repl.eval("b.temperature") == pytest.approx(30.0, abs=TEMPERATURE_TOL_C)


# ---------------------------------------------------------------------------------------------
# ADC
# ---------------------------------------------------------------------------------------------


def test_analog_channel_reports_volts_times_scale_plus_offset(board):
    source = AnalogSource(volts=1.65)
    board.attach_analog(34, source)
    repl = boot_node(board)
    repl.exec("a = sensors.AnalogChannel(34, scale=2.0, offset=-0.5)")
    assert repl.eval("a.read()") == pytest.approx(1.65 * 2.0 - 0.5, abs=2 * 0.001)
    source.volts = 0.25
    assert repl.eval("a.read()") == pytest.approx(0.25 * 2.0 - 0.5, abs=2 * 0.001)


def test_analog_channel_averages_its_samples(board):
    source = AnalogSource(volts=1.0, noise_lsb=40, seed=7)  # +-40 LSB: about +-32 mV
    board.attach_analog(34, source)
    repl = boot_node(board)
    repl.exec("one = sensors.AnalogChannel(34)\navg = sensors.AnalogChannel(34, samples=64)")
    singles = [abs(repl.eval("one.read()") - 1.0) for _ in range(20)]
    averaged = [abs(repl.eval("avg.read()") - 1.0) for _ in range(5)]
    assert max(singles) > 0.015
    assert max(averaged) < 0.008


def test_analog_attenuation_from_the_table_reaches_the_adc(board):
    source = AnalogSource(volts=2.0)
    board.attach_analog(34, source)
    repl = boot_node(board)
    repl.exec("s = sensors.build_sensors(None, [{'name': 'v', 'kind': 'adc', 'pin': 34, "
              "'atten': 0}])\n"
              "got = []\ns.sample(lambda i, v: got.append(v))")
    # 0 dB saturates near 1.04 V, beyond its usable 0.95 V (at 11 dB 2 V reads well): the
    # reading is skipped and counted.
    assert repl.eval("got") == []
    assert repl.eval("s.out_of_range") == [1]
    assert re.search(r"sensor v \(sensors\[0\]\): 1\.0\d\d V is outside the ADC's usable "
                     r"0\.10-0\.95 V", board.console.text())
    source.volts = 0.5
    repl.exec("s.sample(lambda i, v: got.append(v))")
    assert repl.eval("got") == [pytest.approx(0.5, abs=0.001)]


# ---------------------------------------------------------------------------------------------
# Pulse counter
# ---------------------------------------------------------------------------------------------


# Edges the board's scheduler queue refused (counted by the stand-in, as a real board would
# lose them): full when the interpreter sat in C code, or the host delivered a burst.
LOST = "getattr(__import__('_hw'), 'lost_irqs', 0)"


def pulses_while_board_waits(repl, meter, count, pulses="pc.pulses()", rate_hz=200,
                             timeout=5.0):
    """Emit `count` pulses at rate_hz while the board runs, sleeping 1 ms at a time as a
    node's app does, until every edge is counted or refused; returns (counted, refused).

    The port runs pin handlers through its scheduler (a queue of 8 on the ESP32, 4 here), so
    edges are taken while code runs or sleeps; a board blocked in C code (here: the REPL
    reading its input) keeps only the first few. Refused edges are few and come from a
    loaded host, whose threads deliver the meter's edges in bursts.
    """
    repl.exec(f"p0 = {pulses}\nl0 = {LOST}")
    waiter = threading.Thread(target=repl.exec, args=((
        "import time\n"
        "t0 = time.ticks_ms()\n"
        f"while {pulses} - p0 + {LOST} - l0 < {count} and "
        f"time.ticks_diff(time.ticks_ms(), t0) < {int(timeout * 1000)}:\n"
        "    time.sleep_ms(1)\n"
    ),), kwargs={"timeout": timeout + 5})
    waiter.start()
    time.sleep(0.2)  # the board is in its loop
    meter.start(rate_hz=rate_hz, count=count)
    waiter.join()
    meter.stop()
    counted, refused = repl.eval(f"({pulses} - p0, {LOST} - l0)")
    assert counted + refused == count
    assert refused <= count // 20, f"{refused} of {count} edges refused"
    return counted, refused


def test_pulse_counter_total_is_pulses_times_per_pulse(board):
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    repl = boot_node(board)
    repl.exec("pc = sensors.PulseCounter(27, per_pulse=0.5)")
    counted, _ = pulses_while_board_waits(repl, meter, 300)
    assert repl.eval("pc.total()") == counted * 0.5
    assert repl.eval("pc.total()") == counted * 0.5  # reading did not reset it
    more, _ = pulses_while_board_waits(repl, meter, 7)
    assert repl.eval("pc.total()") == (counted + more) * 0.5


def test_pulse_counter_continues_from_its_start_count(board):
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    repl = boot_node(board)
    start = (1 << 29) * 3 + 5  # past three wraps: a total carried over a reset
    repl.exec(f"pc = sensors.PulseCounter(27, per_pulse=0.5, start={start})")
    assert repl.eval("pc.counts()") == (3, 5)
    counted, _ = pulses_while_board_waits(repl, meter, 10)
    assert repl.eval("pc.pulses()") == start + counted


def test_pulse_total_never_dips_while_pulses_arrive_during_reads(board):
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    repl = boot_node(board)
    repl.exec(f"pc = sensors.PulseCounter(27, per_pulse=0.5)\nlast = 0\nreads = 0\ndips = 0\n"
              f"l0 = {LOST}")
    reader = threading.Thread(target=repl.exec, args=((
        "import time\n"
        "t0 = time.ticks_ms()\n"
        "while time.ticks_diff(time.ticks_ms(), t0) < 1500:\n"
        "    t = pc.total()\n"
        "    if t < last:\n"
        "        dips += 1\n"
        "    last = t\n"
        "    reads += 1\n"
    ),), kwargs={"timeout": 10})
    reader.start()
    time.sleep(0.2)
    meter.start(rate_hz=500, count=500)  # 1 s of pulses while the board reads in a loop
    reader.join()
    meter.stop()
    assert meter.emitted == 500
    refused = repl.eval(f"{LOST} - l0")
    assert refused <= 25
    assert repl.eval("pc.total()") == (500 - refused) * 0.5
    assert repl.eval("dips") == 0
    assert repl.eval("reads") > 100


def test_pulse_handler_allocates_nothing_and_counts_across_the_wrap(board):
    repl = boot_node(board)
    # Start just below the wrap (2**29) and run the handler with the heap locked: a scheduled
    # handler may allocate, but garbage at every pulse is what this one must not make. (This
    # board's small ints are 63-bit, so the wrap itself is what keeps the ESP32's 31-bit small
    # ints from overflowing; the lock proves the rest.)
    out = repl.exec(
        "import micropython\n"
        "pc = sensors.PulseCounter(27, per_pulse=2.0)\n"
        "pc._count = sensors.PULSE_WRAP - 2\n"
        "edge = pc._edge\n"
        "pin = pc.pin\n"
        "micropython.heap_lock()\n"
        "try:\n"
        "    for _ in range(5):\n"
        "        edge(pin)\n"
        "finally:\n"
        "    micropython.heap_unlock()\n"
        "print(pc._wraps, pc._count, pc.pulses(), pc.total())\n"
    )
    wrap = 1 << 29
    assert out.split() == [b"1", b"3", str(wrap + 3).encode(), str(float(2 * (wrap + 3))).encode()]


# ---------------------------------------------------------------------------------------------
# The sensor table
# ---------------------------------------------------------------------------------------------



def table(addr: int) -> str:
    """The config's sensor table as board-side source: a BME280's three fields, level, water."""
    bme = "'kind': 'bme280', 'address': %d" % addr  # noqa: UP031 (braces are dict syntax here)
    return (
        f"[{{'name': 'temperature', 'unit': 'C', {bme}, 'field': 'temperature'}},"
        f" {{'name': 'pressure', 'unit': 'Pa', {bme}, 'field': 'pressure'}},"
        f" {{'name': 'humidity', 'unit': '%', {bme}, 'field': 'humidity'}},"
        " {'name': 'level', 'unit': 'm', 'kind': 'adc', 'pin': 34, 'scale': 0.001, 'samples': 4},"
        " {'name': 'water', 'unit': 'L', 'kind': 'pulse', 'pin': 27, 'per_pulse': 0.5}]"
    )


def build(addr: int) -> str:
    """Board-side source that builds the sensor set `s` from table(addr)."""
    return "s = sensors.build_sensors(lambda: i2c, " + table(addr) + ")\n"


SINK = (
    "got = {}\n"
    "def sink(i, v):\n"
    "    got[i] = v\n"
)


def test_sample_reports_every_sensor_in_table_order_measuring_the_bme280_once(board):
    chip = Unpluggable(0x76, temperature_c=18.25, pressure_pa=99000.0, humidity_rh=61.0)
    board.attach_i2c(chip)
    board.attach_analog(34, AnalogSource(volts=1.2))
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    repl = boot_node(board)
    repl.exec(SINK + build(0x76))
    counted, _ = pulses_while_board_waits(repl, meter, 10, "s.channels[4].pulses()")
    starts = chip.forced_starts
    repl.exec("order = []\ns.sample(lambda i, v: order.append(i) or sink(i, v))")
    assert chip.forced_starts == starts + 1  # three fields, one measurement
    assert repl.eval("order") == [0, 1, 2, 3, 4]
    got = repl.eval("got")
    assert got[0] == pytest.approx(18.25, abs=TEMPERATURE_TOL_C)
    assert got[1] == pytest.approx(99000.0, abs=PRESSURE_TOL_PA)
    assert got[2] == pytest.approx(61.0, abs=HUMIDITY_TOL_RH)
    assert got[3] == pytest.approx(1.2 * 0.001, abs=1e-6)
    assert got[4] == counted * 0.5
    assert repl.eval("s.errors") == [0, 0, 0, 0, 0]
    assert repl.eval("len(s.chips)") == 1


def test_sample_skips_a_failing_bme280_counts_its_errors_and_recovers(board):
    chip = Unpluggable(0x76)
    board.attach_i2c(chip)
    board.attach_analog(34, AnalogSource(volts=0.8))
    board.attach_pulses(27, PulseSource(27))
    repl = boot_node(board)
    repl.exec(SINK + build(0x76))
    chip.plugged = False
    repl.exec("for _ in range(3):\n    s.sample(sink)")
    assert sorted(repl.eval("got")) == [3, 4]  # the analog and pulse sensors still report
    assert repl.eval("s.errors") == [3, 3, 3, 0, 0]
    assert repl.eval("s.errors_total()") == 9
    chip.plugged = True
    chip.set(temperature_c=-5.0)
    repl.exec("got.clear()\ns.sample(sink)")
    got = repl.eval("got")
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert got[0] == pytest.approx(-5.0, abs=TEMPERATURE_TOL_C)
    assert repl.eval("s.errors") == [3, 3, 3, 0, 0]


def test_sample_with_no_bme280_on_the_bus_never_raises(board):
    board.attach_analog(34, AnalogSource(volts=0.8))
    repl = boot_node(board)
    repl.exec(SINK + build(0x77))
    repl.exec("for _ in range(2):\n    s.sample(sink)")
    assert repl.eval("s.errors") == [2, 2, 2, 0, 0]
    assert sorted(repl.eval("got")) == [3, 4]


@pytest.mark.parametrize("entry, message", [
    ("{'name': 'wind', 'kind': 'anemometer', 'pin': 4}",
     r"sensors\[1\]\.kind: 'anemometer' is not bme280, adc or pulse"),
    ("{'name': 'level', 'kind': 'adc'}", r"sensors\[1\]\.pin: missing"),
    ("{'name': 'dew', 'kind': 'bme280', 'field': 'dewpoint'}", r"sensors\[1\]\.field: 'dewpoint'"),
    ("{'name': 'rh', 'kind': 'bme280', 'field': 'humidity', 'address': 0x40}",
     r"sensors\[1\]\.address: a BME280 answers at 0x76"),
    ("{'name': 'flow', 'kind': 'pulse', 'pin': 27}",
     r"sensors\[1\]\.pin: GPIO27 is already used by sensors\[0\]"),
    ("{'name': 'level', 'kind': 'adc', 'pin': 34, 'samples': 0}", r"sensors\[1\]\.samples"),
    ("{'name': 'water', 'kind': 'adc', 'pin': 34}",
     r"sensors\[1\]\.name: 'water' is already the name of sensors\[0\]"),
    ("{'name': 'flow', 'kind': 'pulse', 'pin': 7}",
     r"sensors\[1\]\.pin: GPIO7 is wired to the flash"),
    ("{'name': 'flow', 'kind': 'pulse', 'pin': 20}", r"sensors\[1\]\.pin: 20 is not an ESP32 GPIO"),
    ("{'name': 'flow', 'kind': 'pulse', 'pin': 3}", r"sensors\[1\]\.pin: GPIO3 is the serial"),
    ("{'name': 'flow', 'kind': 'pulse', 'pin': 35}", r"sensors\[1\]\.pull: GPIO35 has no pull"),
    ("{'name': 'flow', 'kind': 'pulse', 'pin': 26, 'per_pulse': 0}", r"sensors\[1\]\.per_pulse"),
    ("{'name': 'flow', 'kind': 'pulse', 'pin': 26, 'edge': 'both'}", r"sensors\[1\]\.edge"),
    ("{'name': 'level', 'kind': 'adc', 'pin': 25}", r"sensors\[1\]\.pin: GPIO25 is no ADC1 pin"),
    ("{'name': 'level', 'kind': 'adc', 'pin': 34, 'scale': '2'}", r"sensors\[1\]\.scale"),
    ("{'kind': 'adc', 'pin': 34}", r"sensors\[1\]\.name: must be text"),
])
def test_bad_table_entry_raises_value_error_naming_it(board, entry, message):
    repl = boot_node(board)
    entries = "[{'name': 'water', 'kind': 'pulse', 'pin': 27}, " + entry + "]"
    with pytest.raises(RemoteError, match=message):
        repl.exec("sensors.check_table(" + entries + ")")
    # build_sensors refuses the same table, before it touches any pin.
    with pytest.raises(RemoteError, match=message):
        repl.exec("sensors.build_sensors(lambda: i2c, " + entries + ")")


def test_i2c_bus_is_created_only_when_the_table_has_a_bme280(board):
    board.attach_analog(34, AnalogSource(volts=0.5))
    repl = boot_node(board)
    repl.exec("def no_bus():\n    raise RuntimeError('bus made')\n"
              "s = sensors.build_sensors(no_bus, [{'name': 'v', 'kind': 'adc', 'pin': 34}])")
    assert repl.eval("len(s)") == 1


# ---------------------------------------------------------------------------------------------
# Heap
# ---------------------------------------------------------------------------------------------

# The room 32 KiB of ESP32 heap gives, under a third of a real board's (111 KB), for the
# interpreter, the REPL and the sensors together.
SMALL_HEAP = int(32 * 1024 * HEAP_FACTOR) + STANDIN_ALLOWANCE_BYTES

HEAP_LOOP = (
    "import gc\n"
    "vals = [0.0] * len(s)\n"
    "def store(i, v):\n"
    "    vals[i] = v\n"
    "marks = []\n"
    "for n in range(1, 1001):\n"
    "    s.sample(store)\n"
    "    if n == 100 or n == 1000:\n"
    "        gc.collect()\n"
    "        marks.append(gc.mem_alloc())\n"
    "print(marks[0], marks[1], s.errors)\n"
)


@pytest.mark.parametrize("addr", [0x76, 0x77], ids=["bme280-present", "bme280-absent"])
def test_thousand_sample_rounds_fit_a_small_heap_without_growth(emulator, addr):
    board = emulator.add_board(heap_bytes=SMALL_HEAP)
    board.attach_i2c(BME280(0x76))
    board.attach_analog(34, AnalogSource(volts=1.0))
    meter = PulseSource(27)
    board.attach_pulses(27, meter)
    repl = boot_node(board, compiled=True)
    assert repl.eval("sensors.__file__").endswith(".mpy")
    # Every global the loop makes exists beforehand, so the globals dict cannot grow mid-run.
    repl.exec(build(addr) + "vals = None\nstore = None\nmarks = None\nn = 0\nimport gc\n")
    repl.exec("for _ in range(5):\n    s.sample(lambda i, v: None)")  # warm-up
    meter.start(rate_hz=200)  # the pulse IRQ keeps firing throughout
    try:
        out = repl.exec(HEAP_LOOP, timeout=120)
    finally:
        meter.stop()
    at_100, at_1000, errors = out.decode().split(" ", 2)
    # No growth: equal, give or take one 32-byte GC block that the stand-ins' interrupt thread
    # may hold at the instant of a sample (seen once on a loaded machine).
    assert int(at_1000) <= int(at_100) + 32
    want = "[0, 0, 0, 0, 0]" if addr == 0x76 else "[1005, 1005, 1005, 0, 0]"
    assert errors.strip() == want


# ---------------------------------------------------------------------------------------------
# On a running node
# ---------------------------------------------------------------------------------------------


def test_a_bmp280_sold_as_a_bme280_is_named_on_the_console_and_counted_in_hello(emulator):
    with Receiver({}) as receiver:
        node = launcher.provision(emulator, receiver.port, **FAST)
        receiver.keys[node.key.device_id] = node.key
        node.board.attach_i2c(NotABme280(0x76))  # in the BME280's place: chip id 0x58
        node.board.power_on()
        receiver.wait_for_count(40, node.device)  # the level probe and the meter still report
        view = receiver.devices[node.device]
        wait_until(lambda: view.hello.drops[wire.DROP_SENSOR_ERROR] >= 3,
                   what="a HELLO counting the failed reads")
    text = node.board.console.text()
    assert "chip id 0x58 at I2C address 0x76 is not a BME280" in text
    for i, entry in enumerate(launcher.SENSOR_KIT[:3]):  # the BME280's three fields
        assert entry["kind"] == "bme280"
        assert text.count(f"E kinhbac: sensor {entry['name']} (sensors[{i}]): ") == 1, text
    assert {r.sensor for r in receiver.readings_of(node.device)} == {3, 4}
    assert node.board.boots == [PWRON_RESET]


def test_an_unplugged_bme280_is_named_with_its_failure_count_in_the_gateways_status(
        emulator, tmp_path, broker, collector):
    key_file = tmp_path / "keys.json"
    gateway = GatewayProcess(tmp_path / "gw", key_file=key_file, broker_port=broker.port)
    # flash_every 1: each round's readings go to flash, and the state file with them when the
    # counts moved, so that a reset keeps them (the default saves with the buffer's writes).
    node = launcher.provision(emulator, gateway.port, **FAST, flash_every=1)
    launcher.write_key_file(key_file, [node])
    chip = Unpluggable(0x76)
    node.board.attach_i2c(chip)  # in the kit's BME280's place
    topic = f"kinhbac/testsite/{node.device}/status"
    names = [entry["name"] for entry in launcher.SENSOR_KIT]
    fields = names[:3]  # the BME280's

    def failures(boot=1):
        status = collector.retained.get(topic, {})
        return status.get("sensor_failures") if status.get("boot") == boot else None

    def counts(n):
        return {name: {"sensor_error": n if name in fields else 0, "out_of_range": 0}
                for name in names}

    gateway.start()
    try:
        node.board.power_on()
        collector.wait_for(lambda: failures() == counts(0), what="a status with no failures")
        chip.plugged = False
        # The first failed round logs each field and asks for a HELLO at once: it carries the
        # rounds failed by the time it is sent.
        collector.wait_for(lambda: (failures() or {}).get("pressure", {}).get("sensor_error"),
                           what="a status with the failure")
        early = failures()["pressure"]["sensor_error"]
        assert failures() == counts(early), failures()
        time.sleep(0.5)  # some 25 rounds unplugged
        chip.plugged = True
        node.board.console.wait_for("I kinhbac: sensor pressure (sensors[2]) reads again after")
        text = node.board.console.text()
        missed = {int(n) for n in re.findall(r"\(sensors\[[012]\]\) reads again after (\d+) "
                                               r"failures", text)}
        assert len(missed) == 1 and missed != {1}, text  # one chip: its fields failed together
        (missed,) = missed
        # The recovery is news too: the status has the whole count the console gave.
        collector.wait_for(lambda: failures() == counts(missed), what="the count at recovery")
        assert collector.retained[topic]["drops"]["sensor_error"] == 3 * missed
        for i, name in enumerate(fields):  # once on the console, with the count at that time
            line = f"E kinhbac: sensor {name} (sensors[{i}]): [Errno 19] ENODEV (1 failed, 0 "
            assert text.count(f"E kinhbac: sensor {name} ") == text.count(line) == 1, text

        # Counted since provisioning: a reset (the board's button) keeps them.
        time.sleep(2.0)  # the housekeeping tick (250 ms) after the next flash write saves the state
        node.board.press_reset()
        collector.wait_for(lambda: failures(boot=2) == counts(missed), timeout=60,
                           what="boot 2's status with the counts of boot 1")
    finally:
        gateway.stop()


def test_failure_counts_the_state_file_cannot_hold_count_from_zero_and_the_hello_still_goes(
        emulator):
    with Receiver({}) as receiver:
        node = launcher.provision(emulator, receiver.port, **FAST)
        receiver.keys[node.key.device_id] = node.key
        # Kept from an earlier boot: one good pair, and what no firmware of ours writes.
        node.board.write_files({"/state.json": json.dumps({"boot": 4, "sensor_failures": {
            "temperature": [5, 1], "humidity": "many", "pressure": [1, -2], "level": [True, 0],
            "water": [3]}}).encode()})
        node.board.power_on()
        wait_until(lambda: node.device in receiver.devices
                   and receiver.devices[node.device].hello is not None, what="a HELLO")
        hello = receiver.devices[node.device].hello
    assert hello.boot == 5
    assert hello.failures == [(5, 1), (0, 0), (0, 0), (0, 0), (0, 0)]
