"""Device models of the emulated board: BME280 registers, ADC scaling, pulse outputs."""

from __future__ import annotations

import itertools
import struct
import threading
import time

import pytest

from kinhbac.emulator.devices import (
    BME280,
    DEFAULT_CALIBRATION,
    AnalogSource,
    Calibration,
    PulseSource,
    compensate_humidity,
    compensate_pressure,
    compensate_temperature,
)

# ctrl_meas values: osrs_t << 5 | osrs_p << 2 | mode
X16_X16_FORCED = (5 << 5) | (5 << 2) | 0b01
X1_X1_FORCED = (1 << 5) | (1 << 2) | 0b01
X16_X16_NORMAL = (5 << 5) | (5 << 2) | 0b11


# -- a minimal register-level driver, as firmware would write it from the datasheet ------------

def read_regs(dev: BME280, reg: int, n: int) -> bytes:
    """readfrom_mem: the register pointer in one write, then a read (repeated start)."""
    dev.write(bytes([reg]))
    return dev.read(n)


def write_reg(dev: BME280, reg: int, value: int) -> None:
    """writeto_mem with one byte."""
    dev.write(bytes([reg, value]))


def read_calibration(dev: BME280) -> Calibration:
    """Decode NVM trimming the way the datasheet's table 16 lays it out."""
    b1 = read_regs(dev, 0x88, 26)
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack("<HhhHhhhhhhhh", b1[:24])
    b2 = read_regs(dev, 0xE1, 7)
    h2 = struct.unpack("<h", b2[0:2])[0]
    e4, e5, e6 = struct.unpack("bBb", b2[3:6])  # E4 and E6 carry the sign of H4 and H5
    h4 = (e4 << 4) | (e5 & 0x0F)
    h5 = (e6 << 4) | (e5 >> 4)
    h6 = struct.unpack("b", b2[6:7])[0]
    return Calibration(dig_T1=t1, dig_T2=t2, dig_T3=t3, dig_P1=p1, dig_P2=p2, dig_P3=p3,
                       dig_P4=p4, dig_P5=p5, dig_P6=p6, dig_P7=p7, dig_P8=p8, dig_P9=p9,
                       dig_H1=b1[25], dig_H2=h2, dig_H3=b2[2], dig_H4=h4, dig_H5=h5, dig_H6=h6)


def read_raw(dev: BME280) -> tuple[int, int, int]:
    """Burst-read 0xF7..0xFE: (adc_T, adc_P, adc_H)."""
    d = read_regs(dev, 0xF7, 8)
    adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
    adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
    adc_h = (d[6] << 8) | d[7]
    return adc_t, adc_p, adc_h


def forced_measurement(dev: BME280, ctrl_meas: int = X16_X16_FORCED, osrs_h: int = 5
                       ) -> tuple[float, float, float]:
    """Trigger, poll status until idle, read and compensate: (degC, Pa, %RH)."""
    write_reg(dev, 0xF2, osrs_h)
    write_reg(dev, 0xF4, ctrl_meas)
    for _ in range(10):
        if not read_regs(dev, 0xF3, 1)[0] & 0x08:
            break
    else:
        pytest.fail("status.measuring never cleared")
    cal = read_calibration(dev)
    adc_t, adc_p, adc_h = read_raw(dev)
    t, t_fine = compensate_temperature(cal, adc_t)
    return (t / 100, compensate_pressure(cal, adc_p, t_fine) / 256,
            compensate_humidity(cal, adc_h, t_fine) / 1024)


# -- compensation formulas --------------------------------------------------------------------

def test_compensation_matches_bmp280_datasheet_worked_example() -> None:
    # BST-BMP280-DS001 section 3.12: adc_T 519888 -> t_fine 128422, T 25.08 degC;
    # adc_P 415148 -> 100653.27 Pa (the double-precision result the datasheet quotes).
    t, t_fine = compensate_temperature(DEFAULT_CALIBRATION, 519888)
    assert (t, t_fine) == (2508, 128422)
    p = compensate_pressure(DEFAULT_CALIBRATION, 415148, t_fine)
    assert abs(p / 256 - 100653.27) < 0.05
    assert p == 25767233  # pinned: this transcription's int64 result (100653.254 Pa)


def _humidity_double(cal: Calibration, adc_h: int, t_fine: int) -> float:
    """The BME280 datasheet's double-precision humidity formula (section 8.1)."""
    var_h = t_fine - 76800.0
    var_h = (adc_h - (cal.dig_H4 * 64.0 + cal.dig_H5 / 16384.0 * var_h)) * (
        cal.dig_H2 / 65536.0
        * (1.0 + cal.dig_H6 / 67108864.0 * var_h * (1.0 + cal.dig_H3 / 67108864.0 * var_h)))
    var_h = var_h * (1.0 - cal.dig_H1 * var_h / 524288.0)
    return min(max(var_h, 0.0), 100.0)


@pytest.mark.parametrize("adc_t", [400000, 519888, 600000])
@pytest.mark.parametrize("adc_h", [20000, 27000, 33000, 40000])
def test_integer_humidity_agrees_with_datasheet_double_formula(adc_t: int, adc_h: int) -> None:
    # The datasheet has no worked humidity example; its two formulas must agree instead.
    t_fine = compensate_temperature(DEFAULT_CALIBRATION, adc_t)[1]
    exact = _humidity_double(DEFAULT_CALIBRATION, adc_h, t_fine)
    assert abs(compensate_humidity(DEFAULT_CALIBRATION, adc_h, t_fine) / 1024 - exact) < 0.01


# -- BME280 registers -------------------------------------------------------------------------

def test_chip_id_reads_0x60_with_a_plain_register_read() -> None:
    assert read_regs(BME280(), 0xD0, 1) == b"\x60"


def test_address_is_0x76_by_default_and_0x77_selectable() -> None:
    assert BME280().address == 0x76
    assert BME280(0x77).address == 0x77
    with pytest.raises(ValueError):
        BME280(0x40)


def test_calibration_bytes_decode_back_to_the_constants() -> None:
    assert read_calibration(BME280()) == DEFAULT_CALIBRATION


def test_negative_h4_h5_survive_the_nibble_packing() -> None:
    # Real parts have small positive H4/H5, so a driver's sign handling is only tested this way.
    odd = Calibration(**{**vars(DEFAULT_CALIBRATION), "dig_H4": -1234, "dig_H5": -7,
                         "dig_H6": -5, "dig_H2": -300, "dig_H3": 200})
    assert read_calibration(BME280(calibration=odd)) == odd


def test_calibration_that_does_not_fit_the_registers_is_refused() -> None:
    with pytest.raises(ValueError, match="dig_H4"):
        Calibration(**{**vars(DEFAULT_CALIBRATION), "dig_H4": 2048})


TEMPERATURES = [-40.0, -12.34, 0.0, 21.5, 25.08, 59.99, 85.0]
PRESSURES = [30000.0, 70000.5, 95000.0, 101325.0, 110000.0]
HUMIDITIES = [0.0, 3.3, 45.0, 72.25, 99.9, 100.0]


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_datasheet_formulas_on_read_registers_return_the_set_values(temperature: float) -> None:
    # Resolution: T 0.01 degC (the int32 output's step); P 0.2 Pa (20-bit ADC at x16 is 0.16 Pa);
    # H 0.01 %RH (the 16-bit ADC step is about 0.008 %RH with these trimming values).
    bme = BME280()
    for pressure, humidity in itertools.product(PRESSURES, HUMIDITIES):
        bme.set(temperature_c=temperature, pressure_pa=pressure, humidity_rh=humidity)
        t, p, h = forced_measurement(bme)
        assert abs(t - temperature) <= 0.01
        assert abs(p - pressure) <= 0.2
        assert abs(h - humidity) <= 0.01


def test_pressure_resolution_follows_oversampling_as_on_the_chip() -> None:
    # Filter off: 16 + (osrs - 1) bits, so x1 leaves the low 4 bits of the 20-bit result zero.
    bme = BME280(pressure_pa=98765.4)
    _, p, _ = forced_measurement(bme, ctrl_meas=X1_X1_FORCED)
    adc_t, adc_p, _ = read_raw(bme)
    assert adc_p & 0x0F == 0 and adc_t & 0x0F == 0
    assert abs(p - 98765.4) <= 2.62 / 2 + 0.2  # half the datasheet's 2.62 Pa step at x1
    write_reg(bme, 0xF5, 0b100 << 2)  # IIR filter on: full 20 bits again
    forced_measurement(bme, ctrl_meas=X1_X1_FORCED)
    assert read_raw(bme)[1] & 0x0F != 0


def test_forced_mode_measures_once_then_returns_to_sleep() -> None:
    bme = BME280(busy_reads=2)
    read_regs(bme, 0xF3, 1)  # finish the NVM copy of power-on
    read_regs(bme, 0xF3, 1)
    write_reg(bme, 0xF4, X16_X16_FORCED)
    assert read_regs(bme, 0xF3, 1)[0] & 0x08  # measuring
    assert read_regs(bme, 0xF4, 1)[0] & 0x03 == 0b01  # still forced while measuring
    assert read_regs(bme, 0xF3, 1) == b"\x00"
    assert read_regs(bme, 0xF4, 1)[0] == X16_X16_FORCED & 0xFC  # back to sleep, osrs kept
    first = read_raw(bme)
    bme.set(temperature_c=30.0)
    assert read_raw(bme) == first  # asleep: no new conversion until triggered again


def test_normal_mode_keeps_measuring_the_current_values() -> None:
    bme = BME280()
    write_reg(bme, 0xF2, 1)
    write_reg(bme, 0xF4, X16_X16_NORMAL)
    before = read_raw(bme)
    bme.set(temperature_c=35.0)
    assert read_raw(bme) != before
    assert read_regs(bme, 0xF4, 1)[0] == X16_X16_NORMAL


def test_ctrl_hum_applies_only_after_a_ctrl_meas_write() -> None:
    bme = BME280()
    write_reg(bme, 0xF4, X16_X16_NORMAL)  # ctrl_hum is 0: humidity skipped
    write_reg(bme, 0xF2, 0b001)
    assert read_regs(bme, 0xF2, 1) == b"\x01"  # stored...
    assert read_raw(bme)[2] == 0x8000  # ...but normal mode goes on measuring without humidity
    write_reg(bme, 0xF4, X16_X16_NORMAL)
    assert read_raw(bme)[2] != 0x8000


def test_skipped_measurements_read_as_0x80000_and_0x8000() -> None:
    bme = BME280()
    write_reg(bme, 0xF2, 0)
    write_reg(bme, 0xF4, (0 << 5) | (0 << 2) | 0b01)
    assert read_raw(bme) == (0x80000, 0x80000, 0x8000)
    write_reg(bme, 0xF4, (1 << 5) | (0 << 2) | 0b01)  # temperature on, pressure skipped
    adc_t, adc_p, _ = read_raw(bme)
    assert adc_t != 0x80000 and adc_p == 0x80000


def test_soft_reset_restores_register_defaults() -> None:
    bme = BME280()
    write_reg(bme, 0xF2, 0x03)
    write_reg(bme, 0xF5, 0xA0)
    write_reg(bme, 0xF4, X16_X16_FORCED)
    write_reg(bme, 0xE0, 0x12)  # anything but 0xB6 is ignored
    assert read_regs(bme, 0xF5, 1) == b"\xa0"
    write_reg(bme, 0xE0, 0xB6)
    assert read_regs(bme, 0xF3, 1) == b"\x01"  # im_update: NVM being copied
    assert read_regs(bme, 0xF2, 4) == b"\x00\x00\x00\x00"  # ctrl_hum, status, ctrl_meas, config
    assert read_regs(bme, 0xF7, 8) == bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])
    assert read_calibration(bme) == DEFAULT_CALIBRATION


def test_read_only_registers_ignore_writes() -> None:
    bme = BME280()
    write_reg(bme, 0xD0, 0x58)
    write_reg(bme, 0x88, 0x00)
    assert read_regs(bme, 0xD0, 1) == b"\x60"
    assert read_calibration(bme) == DEFAULT_CALIBRATION


def test_writes_are_register_value_pairs_not_auto_increment() -> None:
    bme = BME280()
    bme.write(bytes([0xF2, 0x01, 0xF5, 0x40]))  # two pairs in one transaction
    assert read_regs(bme, 0xF2, 1) == b"\x01"
    assert read_regs(bme, 0xF5, 1) == b"\x40"
    bme.write(bytes([0xF4, 0x00, 0x20]))  # a trailing byte only moves the pointer
    assert read_regs(bme, 0xF5, 1) == b"\x40"


def test_config_writes_are_ignored_in_normal_mode() -> None:
    bme = BME280()
    write_reg(bme, 0xF4, X16_X16_NORMAL)
    write_reg(bme, 0xF5, 0xA0)
    assert read_regs(bme, 0xF5, 1) == b"\x00"
    write_reg(bme, 0xF4, 0x00)  # sleep first, as the datasheet asks
    write_reg(bme, 0xF5, 0xA0)
    assert read_regs(bme, 0xF5, 1) == b"\xa0"


# -- ADC --------------------------------------------------------------------------------------

# Calibrated top of each attenuation on ADC1 (ESP-IDF line fitting, Vref 1100 mV): the input
# from which the converter reads 4095.
@pytest.mark.parametrize(("atten", "offset_mv", "top_mv"),
                         [(0, 75, 1039), (1, 78, 1357), (2, 107, 1877), (3, 142, 3134)])
def test_adc_follows_the_esp32_calibration_and_saturates_at_each_attenuation(
        atten: int, offset_mv: int, top_mv: int) -> None:
    adc = AnalogSource()
    adc.atten(atten)
    adc.volts = top_mv / 2000
    assert abs(adc.read_uv() - top_mv / 2 * 1000) <= 1000  # the input back, to the millivolt
    assert adc.read_u16() == (adc.read() << 4) | (adc.read() >> 8)
    adc.volts = top_mv * 2 / 1000
    assert (adc.read(), adc.read_u16(), adc.read_uv()) == (4095, 65535, top_mv * 1000)
    adc.volts = -0.2  # below the offset: code 0, whose calibrated value is the offset
    assert (adc.read(), adc.read_u16(), adc.read_uv()) == (0, 0, offset_mv * 1000)


def test_adc_raw_codes_bend_above_2_45_v_at_11_db_and_adc2_has_its_own_curve() -> None:
    adc = AnalogSource()
    adc.atten(3)
    codes = {}
    for volts in (0.5, 1.5, 2.45, 3.0):
        adc.volts = volts
        codes[volts] = adc.read()
    per_volt = (codes[1.5] - codes[0.5]) / 1.0
    assert abs(codes[2.45] - (codes[0.5] + 1.95 * per_volt)) < 15  # still on the line
    assert codes[3.0] - (codes[0.5] + 2.5 * per_volt) > 200  # the lookup table's knee
    adc2 = AnalogSource(volts=1.5)
    adc2.unit = 2
    adc2.atten(3)
    assert adc2.read() != codes[1.5] and abs(adc2.read_uv() - 1_500_000) <= 1000


def test_adc_width_changes_the_raw_range_but_not_read_u16_full_scale() -> None:
    adc = AnalogSource(volts=1.1)  # above the 0 dB top: saturated
    adc.width(9)
    assert (adc.read(), adc.read_u16()) == (511, 65535)
    adc.width(0)  # the ESP-IDF enum older ports pass as ADC.WIDTH_9BIT
    assert adc.read() == 511
    with pytest.raises(ValueError):
        adc.width(13)
    with pytest.raises(ValueError):
        adc.atten(4)


def test_adc_noise_is_off_by_default_and_repeatable_when_on() -> None:
    quiet = AnalogSource(volts=0.5)
    assert len({quiet.read() for _ in range(50)}) == 1
    a = AnalogSource(volts=0.5, noise_lsb=3, seed=7)
    b = AnalogSource(volts=0.5, noise_lsb=3, seed=7)
    readings = [a.read() for _ in range(50)]
    assert readings == [b.read() for _ in range(50)]
    assert len(set(readings)) > 1 and all(abs(r - quiet.read()) <= 3 for r in readings)


# -- pulses -----------------------------------------------------------------------------------

class EdgeRecorder:
    """A sink that keeps every edge, thread-safely."""

    def __init__(self) -> None:
        self.edges: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, pin_id: int, level: int) -> None:
        with self._lock:
            self.edges.append((pin_id, level))


def test_pulses_emit_exactly_n_falling_then_rising_edges_and_count_them() -> None:
    sink = EdgeRecorder()
    src = PulseSource(pin_id=4)
    src.attach(sink)
    src.pulses(25)
    assert sink.edges == [(4, 0), (4, 1)] * 25
    assert src.emitted == 25


def test_pulses_without_a_sink_raise_instead_of_vanishing() -> None:
    with pytest.raises(RuntimeError):
        PulseSource(pin_id=4).pulses(1)


def test_rate_mode_stops_cleanly_after_whole_pulses() -> None:
    sink = EdgeRecorder()
    src = PulseSource(pin_id=5)
    src.attach(sink)
    src.start(500.0)
    deadline = time.monotonic() + 5
    while src.emitted < 10 and time.monotonic() < deadline:
        time.sleep(0.005)
    src.stop()
    assert not src.running
    count = src.emitted
    assert count >= 10
    assert sink.edges == [(5, 0), (5, 1)] * count  # whole pulses only, none after stop()
    time.sleep(0.02)
    assert src.emitted == count


def test_rate_mode_with_a_count_emits_exactly_that_many() -> None:
    sink = EdgeRecorder()
    src = PulseSource(pin_id=6)
    src.attach(sink)
    src.start(1000.0, count=20)
    deadline = time.monotonic() + 5
    while src.running and time.monotonic() < deadline:
        time.sleep(0.005)
    src.stop()
    assert src.emitted == 20 and len(sink.edges) == 40


def test_manual_pulses_do_not_interleave_with_the_rate_thread() -> None:
    sink = EdgeRecorder()
    src = PulseSource(pin_id=7)
    src.attach(sink)
    src.start(2000.0)
    src.pulses(200)
    src.stop()
    assert sink.edges == [(7, 0), (7, 1)] * src.emitted
    assert src.emitted >= 200
