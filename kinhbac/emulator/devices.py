"""Device models behind an emulated ESP32 board: a BME280 on I2C, ADC inputs, pulse outputs.

The board's stand-in `machine` module forwards each I2C transaction, ADC read and pin event
here. The models are deterministic so that a test can set a physical value and know exactly
what the firmware should report.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# I2C
# --------------------------------------------------------------------------------------------


class I2CDevice:
    """An I2C target with a 256-byte register file and an auto-incrementing register pointer."""

    def __init__(self, address: int) -> None:
        if not 0 <= address <= 0x7F:
            raise ValueError(f"I2C address {address:#x} is not a 7-bit address")
        self.address = address
        self._regs = bytearray(256)
        self._pointer = 0
        # The board's bus thread and a test thread may touch a device at the same time.
        self._lock = threading.RLock()

    def write(self, data: bytes) -> None:
        """One write transaction: the first byte sets the pointer, the rest auto-increment."""
        with self._lock:
            if not data:
                return  # an address-only write, as i2c.scan() sends: nothing to do
            self._pointer = data[0]
            for value in data[1:]:
                self._write_register(self._pointer, value)
                self._pointer = (self._pointer + 1) & 0xFF

    def read(self, n: int) -> bytes:
        """One read transaction: n bytes from the register pointer, auto-incrementing."""
        with self._lock:
            out = bytearray(n)
            for i in range(n):
                out[i] = self._read_register(self._pointer)
                self._pointer = (self._pointer + 1) & 0xFF
            self._after_read()
            return bytes(out)

    def _read_register(self, reg: int) -> int:
        return self._regs[reg]

    def _write_register(self, reg: int, value: int) -> None:
        self._regs[reg] = value

    def _after_read(self) -> None:
        """Hook run at the end of each read transaction (STOP or repeated START)."""


# --------------------------------------------------------------------------------------------
# BME280: compensation formulas (the oracle) and calibration
# --------------------------------------------------------------------------------------------

# The chip's operating range; set values outside it saturate at the raw ADC limits.
ADC_T_MAX = 0xFFFFF  # 20-bit temperature ADC
ADC_P_MAX = 0xFFFFF  # 20-bit pressure ADC
ADC_H_MAX = 0xFFFF  # 16-bit humidity ADC
SKIPPED_20BIT = 0x80000  # what a skipped (osrs=0) temperature or pressure reads as
SKIPPED_16BIT = 0x8000  # what a skipped humidity reads as


@dataclass(frozen=True)
class Calibration:
    """Trimming parameters as stored in the chip's NVM (datasheet table 16)."""

    dig_T1: int
    dig_T2: int
    dig_T3: int
    dig_P1: int
    dig_P2: int
    dig_P3: int
    dig_P4: int
    dig_P5: int
    dig_P6: int
    dig_P7: int
    dig_P8: int
    dig_P9: int
    dig_H1: int
    dig_H2: int
    dig_H3: int
    dig_H4: int
    dig_H5: int
    dig_H6: int

    def __post_init__(self) -> None:
        # The register layout can only hold these ranges: refuse what a real chip cannot store.
        u8, s8, u16, s16, s12 = (0, 255), (-128, 127), (0, 65535), (-32768, 32767), (-2048, 2047)
        ranges = {"dig_T1": u16, "dig_P1": u16, "dig_H1": u8, "dig_H3": u8, "dig_H6": s8,
                  "dig_H4": s12, "dig_H5": s12}
        for name, value in vars(self).items():
            lo, hi = ranges.get(name, s16)
            if not lo <= value <= hi:
                raise ValueError(f"{name}={value} does not fit the chip's register ({lo}..{hi})")

    def registers(self) -> tuple[bytes, bytes]:
        """The bytes of calib00..calib25 (0x88..0xA1) and calib26..calib32 (0xE1..0xE7)."""
        block1 = bytearray()
        for value in (self.dig_T1, self.dig_T2, self.dig_T3, self.dig_P1, self.dig_P2,
                      self.dig_P3, self.dig_P4, self.dig_P5, self.dig_P6, self.dig_P7,
                      self.dig_P8, self.dig_P9):
            block1 += (value & 0xFFFF).to_bytes(2, "little")
        block1 += bytes([0x00, self.dig_H1])  # 0xA0 is reserved, 0xA1 is dig_H1
        h4, h5 = self.dig_H4 & 0xFFF, self.dig_H5 & 0xFFF
        block2 = bytes([
            self.dig_H2 & 0xFF, (self.dig_H2 >> 8) & 0xFF,
            self.dig_H3,
            h4 >> 4,  # 0xE4: dig_H4[11:4]
            ((h5 & 0x0F) << 4) | (h4 & 0x0F),  # 0xE5: dig_H5[3:0] | dig_H4[3:0]
            h5 >> 4,  # 0xE6: dig_H5[11:4]
            self.dig_H6 & 0xFF,
        ])
        return bytes(block1), block2


# T and P: the worked example of the BMP280 datasheet (BST-BMP280-DS001, section 3.12), so the
# example's figures double as a test of the formulas. H: typical of real BME280 parts.
DEFAULT_CALIBRATION = Calibration(
    dig_T1=27504, dig_T2=26435, dig_T3=-1000,
    dig_P1=36477, dig_P2=-10685, dig_P3=3024, dig_P4=2855, dig_P5=140, dig_P6=-7,
    dig_P7=15500, dig_P8=-14600, dig_P9=6000,
    dig_H1=75, dig_H2=362, dig_H3=0, dig_H4=313, dig_H5=50, dig_H6=30,
)


def _div_trunc(a: int, b: int) -> int:
    """C integer division (truncates toward zero; Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


# The three compensation functions below transcribe the integer code of the BME280 datasheet
# (BST-BME280-DS002, section 4.2.3, rev. 1.1 of the code). Python's >> is arithmetic like the
# C compilers the datasheet assumes. Python ints never wrap; with real trimming values and
# readings the C int32/int64 code does not overflow either, so the results agree.


def compensate_temperature(cal: Calibration, adc_t: int) -> tuple[int, int]:
    """Datasheet int32 temperature: (T in 0.01 degC, t_fine)."""
    var1 = (((adc_t >> 3) - (cal.dig_T1 << 1)) * cal.dig_T2) >> 11
    d = (adc_t >> 4) - cal.dig_T1
    var2 = (((d * d) >> 12) * cal.dig_T3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_pressure(cal: Calibration, adc_p: int, t_fine: int) -> int:
    """Datasheet int64 pressure: Pa in Q24.8 (divide by 256 for Pa)."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * cal.dig_P6
    var2 += (var1 * cal.dig_P5) << 17
    var2 += cal.dig_P4 << 35
    var1 = ((var1 * var1 * cal.dig_P3) >> 8) + ((var1 * cal.dig_P2) << 12)
    var1 = (((1 << 47) + var1) * cal.dig_P1) >> 33
    if var1 == 0:
        return 0  # the datasheet's guard against division by zero
    p = 1048576 - adc_p
    p = _div_trunc(((p << 31) - var2) * 3125, var1)
    var1 = (cal.dig_P9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (cal.dig_P8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (cal.dig_P7 << 4)


def compensate_humidity(cal: Calibration, adc_h: int, t_fine: int) -> int:
    """Datasheet int32 humidity: %RH in Q22.10 (divide by 1024 for %RH)."""
    v = t_fine - 76800
    v = ((((adc_h << 14) - (cal.dig_H4 << 20) - (cal.dig_H5 * v)) + 16384) >> 15) * (
        ((((((v * cal.dig_H6) >> 10) * (((v * cal.dig_H3) >> 11) + 32768)) >> 10) + 2097152)
         * cal.dig_H2 + 8192) >> 14
    )
    v -= ((((v >> 15) * (v >> 15)) >> 7) * cal.dig_H1) >> 4
    v = min(max(v, 0), 419430400)
    return v >> 12


def _closest_raw(f: Callable[[int], int], target: float, max_raw: int, shift: int,
                 increasing: bool) -> int:
    """The raw value (a multiple of 2**shift) whose compensated output f is nearest target.

    The compensation formulas are monotonic in the raw value, so bisection finds the crossing.
    """
    sign = 1 if increasing else -1
    lo, hi = 0, max_raw >> shift
    while lo < hi:  # smallest k with sign*f(k << shift) >= sign*target
        mid = (lo + hi) // 2
        if sign * f(mid << shift) >= sign * target:
            hi = mid
        else:
            lo = mid + 1
    candidates = [lo] if lo == 0 else [lo - 1, lo]
    best = min(candidates, key=lambda k: abs(f(k << shift) - target))
    return best << shift


def _resolution_shift(osrs: int, filter_on: bool) -> int:
    """Unresolved low bits of a 20-bit T/P result (datasheet 3.4.2/3.4.3): 16+(osrs-1) bits."""
    if filter_on:
        return 0  # with the IIR filter on, results carry all 20 bits
    return max(0, 20 - (15 + min(osrs, 5)))


# --------------------------------------------------------------------------------------------
# BME280: the register model
# --------------------------------------------------------------------------------------------

# Register map (BME280 datasheet section 5.3).
REG_CALIB00 = 0x88
REG_CHIP_ID = 0xD0
REG_RESET = 0xE0
REG_CALIB26 = 0xE1
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_PRESS_MSB = 0xF7  # 0xF7..0xF9 pressure, 0xFA..0xFC temperature, 0xFD..0xFE humidity
CHIP_ID = 0x60
RESET_COMMAND = 0xB6
STATUS_MEASURING = 0x08
STATUS_IM_UPDATE = 0x01
MODE_SLEEP, MODE_NORMAL = 0b00, 0b11  # 0b01 and 0b10 both mean forced


class BME280(I2CDevice):
    """Register-level Bosch BME280 (temperature, pressure, humidity) on I2C.

    Timing is simplified and deterministic: a forced measurement completes the moment ctrl_meas
    is written (the data registers hold the new result at once), but for the next
    `busy_reads` read transactions the chip still looks busy, as a real one does for a few
    milliseconds: status.measuring reads 1 and ctrl_meas still shows forced mode. After a soft
    reset status.im_update reads 1 the same way. In normal mode every read transaction sees
    a fresh measurement of the current physical values; t_sb and the IIR filter are stored but
    not modelled (except that the filter gives results full 20-bit resolution).
    """

    def __init__(self, address: int = 0x76, *, calibration: Calibration = DEFAULT_CALIBRATION,
                 busy_reads: int = 1, temperature_c: float = 21.0, pressure_pa: float = 101325.0,
                 humidity_rh: float = 45.0) -> None:
        if address not in (0x76, 0x77):
            raise ValueError("a BME280 answers at 0x76 (SDO to GND) or 0x77 (SDO to VDDIO)")
        super().__init__(address)
        self.calibration = calibration
        self.busy_reads = busy_reads
        self.temperature_c = temperature_c
        self.pressure_pa = pressure_pa
        self.humidity_rh = humidity_rh
        self._reset()

    def set(self, *, temperature_c: float | None = None, pressure_pa: float | None = None,
            humidity_rh: float | None = None) -> None:
        """Change the air around the sensor; the next measurement reports it."""
        with self._lock:
            if temperature_c is not None:
                self.temperature_c = temperature_c
            if pressure_pa is not None:
                self.pressure_pa = pressure_pa
            if humidity_rh is not None:
                self.humidity_rh = humidity_rh

    def raw_values(self, osrs_t: int = 5, osrs_p: int = 5, filter_on: bool = False
                   ) -> tuple[int, int, int]:
        """(adc_T, adc_P, adc_H) that compensate to the current physical values."""
        cal = self.calibration
        adc_t = _closest_raw(lambda x: compensate_temperature(cal, x)[1],
                             self.temperature_c * 5120.0, ADC_T_MAX,
                             _resolution_shift(osrs_t, filter_on), increasing=True)
        # P and H are inverted with the t_fine a driver will compute from the adc_T it reads,
        # so that its results land on the set values, not merely near them.
        t_fine = compensate_temperature(cal, adc_t)[1]
        adc_p = _closest_raw(lambda x: compensate_pressure(cal, x, t_fine),
                             self.pressure_pa * 256.0, ADC_P_MAX,
                             _resolution_shift(osrs_p, filter_on), increasing=False)
        adc_h = _closest_raw(lambda x: compensate_humidity(cal, x, t_fine),
                             self.humidity_rh * 1024.0, ADC_H_MAX, 0, increasing=True)
        return adc_t, adc_p, adc_h

    # -- I2C transactions ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """One write transaction: (register, value) pairs, as the BME280 takes them.

        The chip does not auto-increment on writes (datasheet 6.2.1): a driver that sends
        `reg, v1, v2` writes v1 to reg and leaves v2 as the register pointer, here as there.
        """
        with self._lock:
            for i in range(0, len(data), 2):
                self._pointer = data[i]
                if i + 1 < len(data):
                    self._write_register(data[i], data[i + 1])

    def _write_register(self, reg: int, value: int) -> None:
        if reg == REG_RESET:
            if value == RESET_COMMAND:
                self._reset()
        elif reg == REG_CTRL_HUM:
            self._regs[reg] = value & 0x07  # stored now, applied at the next ctrl_meas write
        elif reg == REG_CTRL_MEAS:
            self._regs[reg] = value
            self._osrs_h = self._regs[REG_CTRL_HUM]
            if value & 0x03 in (0b01, 0b10):
                self._measure()
                self._busy = self.busy_reads
                self._forced_pending = True
                self._finish_if_idle()
        elif reg == REG_CONFIG and self._regs[REG_CTRL_MEAS] & 0x03 != MODE_NORMAL:
            # "Writes to the config register in normal mode may be ignored" (datasheet 5.4.6):
            # always ignore them here, so a driver that forgets sleep mode first is caught.
            self._regs[reg] = value & 0xFD  # bit 1 is reserved
        # every other register is read-only (calibration, id, status, data): writes are lost

    def _read_register(self, reg: int) -> int:
        if reg == REG_STATUS:
            if self._busy and self._forced_pending:
                return STATUS_MEASURING
            if self._busy:
                return STATUS_IM_UPDATE
            return 0
        return self._regs[reg]

    def read(self, n: int) -> bytes:
        """One read transaction: n bytes from the register pointer, auto-incrementing."""
        with self._lock:
            # Normal mode: measure at the start of a burst so the burst is one consistent sample
            # (the chip's shadow registers give the same guarantee).
            if self._regs[REG_CTRL_MEAS] & 0x03 == MODE_NORMAL:
                self._measure()
            return super().read(n)

    def _after_read(self) -> None:
        if self._busy:
            self._busy -= 1
            self._finish_if_idle()

    # -- internals ------------------------------------------------------------------------

    def _finish_if_idle(self) -> None:
        if self._busy == 0 and self._forced_pending:
            self._forced_pending = False
            self._regs[REG_CTRL_MEAS] &= 0xFC  # forced mode falls back to sleep by itself

    def _reset(self) -> None:
        """Power-on reset: register defaults (datasheet 5.3), NVM copied again."""
        self._regs[:] = bytes(256)
        block1, block2 = self.calibration.registers()
        self._regs[REG_CALIB00:REG_CALIB00 + len(block1)] = block1
        self._regs[REG_CALIB26:REG_CALIB26 + len(block2)] = block2
        self._regs[REG_CHIP_ID] = CHIP_ID
        self._regs[REG_PRESS_MSB:REG_PRESS_MSB + 8] = bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])
        self._osrs_h = 0
        self._forced_pending = False
        self._busy = self.busy_reads  # im_update: the NVM copy after reset

    def _measure(self) -> None:
        """Run one conversion with the latched settings and fill the data registers."""
        ctrl = self._regs[REG_CTRL_MEAS]
        osrs_t, osrs_p = ctrl >> 5, (ctrl >> 2) & 0x07
        filter_on = (self._regs[REG_CONFIG] >> 2) & 0x07 != 0
        adc_t, adc_p, adc_h = self.raw_values(max(osrs_t, 1), max(osrs_p, 1), filter_on)
        if osrs_t == 0:
            adc_t = SKIPPED_20BIT
        if osrs_p == 0:
            adc_p = SKIPPED_20BIT
        if self._osrs_h == 0:
            adc_h = SKIPPED_16BIT
        self._regs[REG_PRESS_MSB:REG_PRESS_MSB + 8] = bytes([
            adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
            adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4,
            adc_h >> 8, adc_h & 0xFF,
        ])


# --------------------------------------------------------------------------------------------
# ADC input
# --------------------------------------------------------------------------------------------

# The ESP32's ADC as ESP-IDF characterises it: the line-fitting calibration that read_uv() runs
# (MicroPython v1.24.1 ports/esp32/adc.c:102-109 -> ESP-IDF v5.2
# components/esp_adc/esp32/adc_cali_line_fitting.c), for a chip whose eFuse Vref is the nominal
# 1100 mV. The emulated converter is the chip that calibration describes exactly: raw codes are
# its inverse, so read() shows the real curve (nothing below the offset, 142 mV at 11 dB; the
# knee above 2.45 V; 4095 from about 3.13 V) and read_uv() gives the input back to ~1 mV.
VREF_MV = 1100
_LIN_SCALE = 65536  # LIN_COEFF_A_SCALE: coeff_a is a 16.16 fixed-point gain
_RES_12 = 4096  # ADC_12_BIT_RES
# adc{1,2}_vref_atten_scale / _offset, per attenuation 0 / 2.5 / 6 / 11 dB.
_VREF_ATTEN_SCALE = {1: (57431, 76236, 105481, 196602), 2: (57236, 76175, 105678, 197170)}
_VREF_ATTEN_OFFSET = {1: (75, 78, 107, 142), 2: (63, 66, 89, 128)}
# At 11 dB, codes from LUT_LOW_THRESH up follow two measured curves (Vref 1000 and 1200 mV),
# 20 points 64 codes apart, interpolated for the chip's Vref: the curve flattens there.
_LUT_VREF_LOW, _LUT_VREF_HIGH = 1000, 1200
_LUT_STEP = 64
_LUT_LOW_THRESH = 2880
_LUT = {
    1: ((2240, 2297, 2352, 2405, 2457, 2512, 2564, 2616, 2664, 2709,
         2754, 2795, 2832, 2868, 2903, 2937, 2969, 3000, 3030, 3060),
        (2667, 2706, 2745, 2780, 2813, 2844, 2873, 2901, 2928, 2956,
         2982, 3006, 3032, 3059, 3084, 3110, 3135, 3160, 3184, 3209)),
    2: ((2238, 2293, 2347, 2399, 2451, 2507, 2561, 2613, 2662, 2710,
         2754, 2792, 2831, 2869, 2904, 2937, 2968, 2999, 3029, 3059),
        (2657, 2698, 2738, 2774, 2807, 2838, 2867, 2894, 2921, 2946,
         2971, 2996, 3020, 3043, 3067, 3092, 3116, 3139, 3162, 3185)),
}
ATTEN_11DB = 3
# ADC2's pins (ports/esp32/machine_adc.c:80-89); the rest of the ADC pins are ADC1's.
ADC2_PINS = frozenset((0, 2, 4, 12, 13, 14, 15, 25, 26, 27))
# width() takes the bit count (newer ports) or the ESP-IDF enum 0..3 (older ports' WIDTH_*).
_WIDTH_ENUM = {0: 9, 1: 10, 2: 11, 3: 12}


def calibrated_mv(raw12: int, atten: int, unit: int = 1, vref_mv: int = VREF_MV) -> int:
    """ESP-IDF's cali_raw_to_voltage() for a 12-bit code: the millivolts read_uv() reports / 1000.

    Integer arithmetic as in the C, so results match the chip's to the millivolt.
    """
    raw = min(max(raw12, 0), _RES_12 - 1)
    coeff_a = vref_mv * _VREF_ATTEN_SCALE[unit][atten] // _RES_12  # characterize_using_vref
    coeff_b = _VREF_ATTEN_OFFSET[unit][atten]
    linear = (coeff_a * raw + _LIN_SCALE // 2) // _LIN_SCALE + coeff_b
    if atten != ATTEN_11DB or raw < _LUT_LOW_THRESH:
        return linear
    low, high = _LUT[unit]
    i = min((raw - _LUT_LOW_THRESH) // _LUT_STEP, len(low) - 2)
    x2dist = _LUT_VREF_HIGH - vref_mv
    x1dist = vref_mv - _LUT_VREF_LOW
    y2dist = (i + 1) * _LUT_STEP + _LUT_LOW_THRESH - raw
    y1dist = raw - (i * _LUT_STEP + _LUT_LOW_THRESH)
    lut = (low[i] * x2dist * y2dist + high[i] * x1dist * y2dist
           + low[i + 1] * x2dist * y1dist + high[i + 1] * x1dist * y1dist)
    span = (_LUT_VREF_HIGH - _LUT_VREF_LOW) * _LUT_STEP
    lut = (lut + span // 2) // span
    if raw > _LUT_LOW_THRESH + _LUT_STEP:
        return lut
    # Across the first step the result moves from the line to the table (interpolate_two_points).
    x = raw - _LUT_LOW_THRESH
    return (linear * _LUT_STEP + lut * x - linear * x + _LUT_STEP // 2) // _LUT_STEP


def _curve(atten: int, unit: int) -> list[int]:
    """calibrated_mv for every 12-bit code: non-decreasing, so a voltage maps back by search."""
    return [calibrated_mv(raw, atten, unit) for raw in range(_RES_12)]


_CURVES = {(atten, unit): _curve(atten, unit) for atten in range(4) for unit in (1, 2)}


class AnalogSource:
    """A voltage on an ESP32 ADC pin, converted as the ESP32's SAR ADC does (see calibrated_mv).

    read() is the raw code of the chip the line-fitting calibration describes: 0 below the
    calibration's offset, the input's code in the linear range, the compressed codes of
    the 11 dB knee and 4095 above the top (about 1.04 / 1.36 / 1.88 / 3.13 V at 0 / 2.5 / 6 /
    11 dB on ADC1). read_uv() is the calibrated value of that code, in whole millivolts x 1000
    as on the port. Optional noise adds a uniform integer in [-noise_lsb, noise_lsb] to each
    raw reading from a seeded generator, so runs repeat. `unit` is 1 or 2 (ADC2's pins): the
    board sets it when the source is attached.
    """

    def __init__(self, volts: float = 0.0, *, noise_lsb: int = 0, seed: int = 0) -> None:
        self.volts = volts
        self.noise_lsb = noise_lsb
        self.unit = 1
        self._rng = random.Random(seed)
        self._atten = 0  # MicroPython's default: 0 dB
        self._bits = 12
        self._lock = threading.Lock()

    def atten(self, n: int) -> None:
        """Select attenuation 0..3 (ADC.ATTN_0DB, _2_5DB, _6DB, _11DB)."""
        if n not in range(4):
            raise ValueError(f"attenuation must be 0..3, not {n}")
        self._atten = n

    def width(self, bits: int) -> None:
        """Select the result width: 9..12 bits (or the ESP-IDF enum 0..3)."""
        bits = _WIDTH_ENUM.get(bits, bits)
        if not 9 <= bits <= 12:
            raise ValueError(f"width must be 9..12 bits, not {bits}")
        self._bits = bits

    @property
    def full_scale_v(self) -> float:
        """The calibrated voltage of the top code: inputs above it read 4095 (saturated)."""
        return _CURVES[self._atten, self.unit][-1] / 1000

    def _raw12(self) -> int:
        # The code whose calibrated value is nearest the input: the curve is non-decreasing.
        curve = _CURVES[self._atten, self.unit]
        mv = self.volts * 1000
        i = bisect.bisect_left(curve, mv)
        if i == 0:
            return 0
        if i >= len(curve):
            return _RES_12 - 1
        return i if curve[i] - mv < mv - curve[i - 1] else i - 1

    def read(self) -> int:
        """Raw conversion, 0..2**bits-1 (4095 at the default 12 bits)."""
        top = (1 << self._bits) - 1
        raw = self._raw12() >> (12 - self._bits)
        if self.noise_lsb:
            with self._lock:  # random.Random is not safe to share between threads
                raw += self._rng.randint(-self.noise_lsb, self.noise_lsb)
        return min(max(raw, 0), top)

    def read_u16(self) -> int:
        """Raw conversion scaled to 0..65535 by bit replication, as MicroPython's esp32 port."""
        raw, bits = self.read(), self._bits
        return (raw << (16 - bits)) | (raw >> (2 * bits - 16))

    def read_uv(self) -> int:
        """The calibrated input in microvolts: whole millivolts x 1000, as the port returns."""
        return calibrated_mv(self.read() << (12 - self._bits), self._atten, self.unit) * 1000


# --------------------------------------------------------------------------------------------
# Pulse output (water or energy meter)
# --------------------------------------------------------------------------------------------

EdgeSink = Callable[[int, int], None]


class PulseSource:
    """A meter's pulse output on one pin: idle high, each pulse a falling then a rising edge.

    Open-collector meter outputs (reed switch, S0) pull an input with a pull-up low for each
    pulse, hence idle high. Emissions are serialised, so edges of two pulses never interleave
    even when a test calls pulses() while the rate thread runs. The sink is called with the
    emission lock held and must not call back into this object's pulses() from another thread.
    """

    def __init__(self, pin_id: int, *, pulse_width_s: float = 0.0) -> None:
        self.pin_id = pin_id
        self.pulse_width_s = pulse_width_s
        self.emitted = 0
        self._sink: EdgeSink | None = None
        self._emit_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def attach(self, sink: EdgeSink) -> None:
        """Connect the emulator's edge sink, called as sink(pin_id, level)."""
        self._sink = sink

    def pulses(self, n: int) -> None:
        """Emit n full pulses now, each held low for pulse_width_s."""
        for _ in range(n):
            self._pulse()

    def start(self, rate_hz: float, count: int | None = None) -> None:
        """Emit pulses at rate_hz from a background thread, forever or for count pulses."""
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        if self.pulse_width_s >= 1.0 / rate_hz:
            raise ValueError("pulse_width_s must be shorter than the pulse period")
        if self._thread is not None:
            raise RuntimeError("pulse source already running; stop() it first")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(rate_hz, count),
                                        name=f"pulses-pin{self.pin_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the rate thread after the pulse in progress; no edge follows the return."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join()
        self._thread = None

    @property
    def running(self) -> bool:
        """Whether the rate thread is emitting."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self, rate_hz: float, count: int | None) -> None:
        period = 1.0 / rate_hz
        # Deadlines from one start time, so sleep overshoot does not accumulate into drift.
        start = time.monotonic()
        i = 0
        while count is None or i < count:
            if self._stop.wait(max(0.0, start + i * period - time.monotonic())):
                return
            self._pulse()
            i += 1

    def _pulse(self) -> None:
        sink = self._sink
        if sink is None:
            raise RuntimeError("no sink attached: call attach() before emitting pulses")
        with self._emit_lock:
            sink(self.pin_id, 0)
            if self.pulse_width_s:
                time.sleep(self.pulse_width_s)
            sink(self.pin_id, 1)
            self.emitted += 1
