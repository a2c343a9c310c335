# Sensor drivers for the node: a BME280 on I2C, ADC channels, meter pulse counters, and the
# sensor set that turns the config's sensor table into readings, one round at a time.
import struct
import time
from errno import EIO, ENODEV, ETIMEDOUT

from machine import ADC, Pin
from micropython import const

from node import forget, log

# BME280 register map (Bosch BST-BME280-DS002, section 5.3).
_REG_CALIB00 = const(0x88)  # 0x88..0xA1: dig_T1..dig_P9, 0xA1 dig_H1
_REG_CHIP_ID = const(0xD0)
_REG_RESET = const(0xE0)
_REG_CALIB26 = const(0xE1)  # 0xE1..0xE7: dig_H2..dig_H6
_REG_CTRL_HUM = const(0xF2)
_REG_STATUS = const(0xF3)  # status and ctrl_meas are adjacent: one read answers "done?"
_REG_CTRL_MEAS = const(0xF4)
_REG_DATA = const(0xF7)  # press[3], temp[3], hum[2]: one burst is one consistent sample
_CHIP_ID = const(0x60)
_RESET_WORD = const(0xB6)
_MEASURING = const(0x08)
_IM_UPDATE = const(0x01)
_FORCED = const(0x01)
_SKIPPED_20BIT = const(0x80000)  # what temperature or pressure read when not measured
_SKIPPED_16BIT = const(0x8000)  # the same for humidity
_STARTUP_MS = const(2)  # datasheet table 1: the chip answers 2 ms after a reset
_NVM_COPY_MS = const(10)  # im_update lasts well under 1 ms; 10 ms means the chip is stuck
_MARGIN_MS = const(10)  # over t_measure,max: a slow bus or a late tick, not a stuck chip

# PulseCounter wraps its count here so it stays a small int (< 2**30 on the ESP32): a bigger
# int is a heap object, which the edge handler would allocate at every pulse.
PULSE_WRAP = const(0x20000000)

MAX_SAMPLES = const(64)  # 64 * 3.3 V in uV stays a small int
_FIELDS = ("temperature", "pressure", "humidity")
# What the ESP32's ADC measures well, in mV, per attenuation (ESP-IDF's ADC guide for the
# ESP32): outside it the curve flattens and at 11 dB it saturates near 3.1 V, so a value
# there is not a measurement. read_uv() is the eFuse-calibrated figure (ports/esp32/adc.c).
_USABLE_MV = {0: (100, 950), 2.5: (100, 1250), 6: (150, 1750), 11: (150, 2450)}
_LOG_AGAIN_MS = const(600000)  # a sensor failing the same way is logged again this often
OUT_OF_RANGE = const(-1)  # a failure's kind beside the errno of an OSError
_NONE_FAILED = (0, 0)  # a sensor's failures before this start when the state file has none


def _osrs(factor):
    # Oversampling factor 1/2/4/8/16 -> register code 1..5 (datasheet 7.4.3).
    if factor not in (1, 2, 4, 8, 16):
        raise ValueError("oversampling must be 1, 2, 4, 8 or 16")
    return (1, 2, 4, 8, 16).index(factor) + 1


class BME280:
    """Bosch BME280 in forced mode; measure() sets .temperature C, .pressure Pa, .humidity %RH.

    Compensation uses the datasheet's floating-point formulas (section 8.1): on MicroPython the
    int32/int64 versions overflow small ints and allocate bigints at every step, floats once.
    """

    def __init__(self, i2c, address=0x76, osrs_t=1, osrs_p=4, osrs_h=1):
        self.i2c = i2c
        self.address = address
        self._ctrl_hum = _osrs(osrs_h)
        self._ctrl_meas = (_osrs(osrs_t) << 5) | (_osrs(osrs_p) << 2) | _FORCED
        # t_measure,max in us (datasheet 9.1): 1250 + 2300*T + (2300*P + 575) + (2300*H + 575)
        us = 1250 + 2300 * (osrs_t + osrs_p + osrs_h) + 1150
        self._timeout_ms = (us + 999) // 1000 + _MARGIN_MS
        self._pair = bytearray(2)  # one register/value pair: writes never auto-increment
        self._status = bytearray(2)
        self._data = bytearray(8)
        self.ready = False  # probed, reset and calibrated
        self.valid = False  # the three results below come from the last measure()
        self.error = None  # why the last measure() failed (an OSError), for the log
        self.temperature = 0.0
        self.pressure = 0.0
        self.humidity = 0.0

    def init(self):
        """Probe the chip id, soft-reset, read calibration; OSError if no BME280 answers."""
        self.ready = False
        addr = self.address
        buf = self._pair  # chip id, then 0xD1 (reserved)
        try:
            self.i2c.readfrom_mem_into(addr, _REG_CHIP_ID, buf)
        except OSError:
            raise OSError(ENODEV, "no BME280 at I2C address 0x%02x" % addr)
        if buf[0] != _CHIP_ID:
            raise OSError(ENODEV, "chip id 0x%02x at I2C address 0x%02x is not a BME280 (0x60)"
                          % (buf[0], addr))
        self._write(_REG_RESET, _RESET_WORD)
        time.sleep_ms(_STARTUP_MS)
        self._wait(_IM_UPDATE, _NVM_COPY_MS)
        self._calibrate()
        # After a reset the chip sleeps with default config (filter off): ctrl_hum is all that
        # needs setting here, and it only takes effect at the next ctrl_meas write.
        self._write(_REG_CTRL_HUM, self._ctrl_hum)
        self.ready = True

    def _calibrate(self):
        addr = self.address
        cal = bytearray(26)
        self.i2c.readfrom_mem_into(addr, _REG_CALIB00, cal)
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack_from("<HhhHhhhhhhhh", cal)
        h1 = cal[25]
        cal = bytearray(7)
        self.i2c.readfrom_mem_into(addr, _REG_CALIB26, cal)
        h2, h3, e4, e5, e6, h6 = struct.unpack_from("<hBbBbb", cal)
        # dig_H4/H5 are signed 12-bit values sharing 0xE5: H4 = E4[7:0]:E5[3:0],
        # H5 = E6[7:0]:E5[7:4]. E4 and E6 are read signed, so the shift sign-extends.
        h4 = (e4 << 4) | (e5 & 0x0F)
        h5 = (e6 << 4) | (e5 >> 4)
        if t1 == 0 or p1 == 0:
            raise OSError(EIO, "BME280 at 0x%02x has blank calibration" % addr)
        # Calibration-only terms of the formulas, computed once (powers of two: exact).
        self._t1a = t1 / 1024.0
        self._t1b = t1 / 8192.0
        self._t2 = float(t2)
        self._t3 = float(t3)
        self._p1 = float(p1)
        self._p2 = float(p2)
        self._p3 = p3 / 524288.0
        self._p4 = p4 * 65536.0
        self._p5 = p5 * 2.0
        self._p6 = p6 / 32768.0
        self._p7 = float(p7)
        self._p8 = p8 / 32768.0
        self._p9 = p9 / 2147483648.0
        self._h1 = h1 / 524288.0
        self._h2 = h2 / 65536.0
        self._h3 = h3 / 67108864.0
        self._h4 = h4 * 64.0
        self._h5 = h5 / 16384.0
        self._h6 = h6 / 67108864.0

    def _write(self, reg, value):
        buf = self._pair
        buf[0] = reg
        buf[1] = value
        self.i2c.writeto(self.address, buf)

    def _wait(self, status_bits, timeout_ms):
        # Done when the status bits clear and ctrl_meas shows sleep again: forced mode sets
        # the mode bits at once, so this cannot race a conversion that has not started yet.
        buf = self._status
        start = time.ticks_ms()
        while True:
            # Whether the time was up is decided before the read: a task held up past the
            # deadline (by an IRQ, a flash write) still looks once more before giving up.
            expired = time.ticks_diff(time.ticks_ms(), start) > timeout_ms
            self.i2c.readfrom_mem_into(self.address, _REG_STATUS, buf)
            if not (buf[0] & status_bits or buf[1] & 0x03):
                return
            if expired:
                raise OSError(ETIMEDOUT, "BME280 at 0x%02x stays busy" % self.address)
            time.sleep_ms(1)

    def measure(self):
        """Run one forced measurement; OSError if the chip is absent, busy or returns no data."""
        self.valid = False
        if not self.ready:
            self.init()
        d = self._data
        try:
            self._write(_REG_CTRL_MEAS, self._ctrl_meas)
            self._wait(_MEASURING, self._timeout_ms)
            self.i2c.readfrom_mem_into(self.address, _REG_DATA, d)
        except OSError:
            self.ready = False  # probe again next time: the chip may be reset or replaced
            raise
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        if adc_t == _SKIPPED_20BIT or adc_p == _SKIPPED_20BIT or adc_h == _SKIPPED_16BIT:
            self.ready = False  # a brown-out reset the chip's settings
            raise OSError(EIO, "BME280 at 0x%02x returned no data" % self.address)
        # Temperature (datasheet 8.1); t_fine feeds the other two.
        v1 = (adc_t / 16384.0 - self._t1a) * self._t2
        v2 = adc_t / 131072.0 - self._t1b
        t_fine = v1 + v2 * v2 * self._t3
        # Pressure.
        v1 = t_fine / 2.0 - 64000.0
        v2 = v1 * v1 * self._p6 + v1 * self._p5
        v2 = v2 / 4.0 + self._p4
        v1 = (self._p3 * v1 * v1 + self._p2 * v1) / 524288.0
        v1 = (1.0 + v1 / 32768.0) * self._p1
        if v1 == 0.0:
            self.ready = False
            raise OSError(EIO, "BME280 at 0x%02x: pressure out of range" % self.address)
        p = ((1048576.0 - adc_p) - v2 / 4096.0) * 6250.0 / v1
        p += (self._p9 * p * p + p * self._p8 + self._p7) / 16.0
        # Humidity.
        h = t_fine - 76800.0
        h = (adc_h - (self._h4 + self._h5 * h)) * (
            self._h2 * (1.0 + self._h6 * h * (1.0 + self._h3 * h)))
        h *= 1.0 - self._h1 * h
        self.temperature = t_fine / 5120.0
        self.pressure = p
        self.humidity = 0.0 if h < 0.0 else 100.0 if h > 100.0 else h
        self.valid = True


class AnalogChannel:
    """An ADC pin read as volts * scale + offset, averaged over `samples` reads.

    read() is None when a sample falls outside the attenuation's usable range (`usable_mv`,
    the 11 dB one by default): the reading is skipped, not clipped into a wrong value.
    """

    def __init__(self, pin, scale=1.0, offset=0.0, atten=ADC.ATTN_11DB, samples=1,
                 usable_mv=_USABLE_MV[11]):
        if not 1 <= samples <= MAX_SAMPLES:
            raise ValueError("samples must be 1..%d" % MAX_SAMPLES)
        self.adc = ADC(Pin(pin), atten=atten)
        self.samples = samples
        self.scale = float(scale)
        self.offset = float(offset)
        self._k = self.scale / (samples * 1000000)  # sum of microvolts -> scaled units
        self._low = usable_mv[0] * 1000
        self._high = usable_mv[1] * 1000
        self.last_uv = 0  # the sample that was out of range, for the log line

    def read(self):
        """The scaled value (a float), or None when the input is out of the usable range."""
        adc = self.adc
        low = self._low
        high = self._high
        total = 0
        for _ in range(self.samples):
            uv = adc.read_uv()
            if uv < low or uv > high:
                self.last_uv = uv
                return None
            total += uv
        return total * self._k + self.offset

    def fault_kind(self):
        return OUT_OF_RANGE

    def fault_text(self):
        return "%.3f V is outside the ADC's usable %.2f-%.2f V" % (
            self.last_uv / 1e6, self._low / 1e6, self._high / 1e6)


class PulseCounter:
    """Counts pulses on a pin; total() is count * per_pulse and never resets.

    The ESP32 port runs every pin handler through mp_sched_schedule (its Pin.irq has no hard
    IRQ), so the handler runs between bytecodes of the main task and only adds one. Edges
    that arrive while the interpreter is held in C code can be lost (docs/firmware.md).
    `start` is the count to continue from (a total kept across a reset).
    """

    def __init__(self, pin, per_pulse=1.0, pull=Pin.PULL_UP, trigger=Pin.IRQ_FALLING, start=0,
                 name=""):
        self.name = name  # the key under which the total outlives a reset (node/rtc.py)
        self.per_pulse = float(per_pulse)  # so total() is a float even for "per_pulse": 1
        self._wraps = start // PULSE_WRAP
        self._count = start % PULSE_WRAP
        self.pin = Pin(pin, Pin.IN, pull)
        self.pin.irq(self._edge, trigger=trigger)

    def _edge(self, pin):
        # One edge: no allocation. The count wraps before it could outgrow a small int.
        c = self._count + 1
        if c == PULSE_WRAP:
            self._wraps += 1
            c = 0
        self._count = c

    def counts(self):
        """(wraps, count): the pulses as two small ints, read consistently."""
        # The handler runs between any two bytecodes: re-read if a wrap landed between loads.
        while True:
            w = self._wraps
            c = self._count
            if w == self._wraps:
                return w, c

    def pulses(self):
        """Pulses counted since start, as an exact int."""
        while True:
            w = self._wraps
            c = self._count
            if w == self._wraps:
                return w * PULSE_WRAP + c

    def total(self):
        """Cumulative pulses * per_pulse (e.g. litres)."""
        return self.pulses() * self.per_pulse

    read = total

    def deinit(self):
        """Stop counting."""
        self.pin.irq(None)


class _Field:
    # One of a BME280's results as a channel: None when the round's measurement failed.
    def __init__(self, chip, which):
        self.chip = chip
        self.which = which

    def read(self):
        chip = self.chip
        if not chip.valid:
            return None
        w = self.which
        return chip.temperature if w == 0 else chip.pressure if w == 1 else chip.humidity

    def fault_kind(self):
        e = self.chip.error
        return e.errno if e is not None else 0

    def fault_text(self):
        return str(self.chip.error)


class SensorSet:
    """The config's sensors in table order; sample(sink) reads one round.

    A sensor that fails is skipped and counted: `errors` (it could not be read) and
    `out_of_range` (it read a value outside what it measures), per table entry, since this set
    started. Its first failure of each kind is logged at once with the sensor's name, the same
    failure again at most every 10 minutes, and its recovery; `news` is set with every such
    line, so that the node can send the counts on (a HELLO). `failed` maps a sensor's name to
    its [errors, out of range] before this start (the state file's): failures() adds them.
    """

    def __init__(self, channels, chips, names=None, failed=None):
        self.channels = channels
        self.chips = chips  # the BME280s, each measured once per round
        n = len(channels)
        self.names = names or [str(i) for i in range(n)]
        self.errors = [0] * n  # failed reads per table entry
        self.out_of_range = [0] * n  # readings outside the sensor's range per table entry
        failed = failed or {}
        self._before = [failed.get(name, _NONE_FAILED) for name in self.names]
        self.pulses = [ch for ch in channels if isinstance(ch, PulseCounter)]
        self.news = False
        self._kind = [None] * n  # the failure last logged per entry, None while it reads
        self._logged = [0] * n  # ticks_ms of that line
        self._since = [0] * n  # failures since the entry last read

    def __len__(self):
        return len(self.channels)

    def sample(self, sink):
        """Call sink(index, value) per sensor; a failing sensor is skipped and counted."""
        for chip in self.chips:
            try:
                chip.measure()
                chip.error = None
            except OSError as e:
                chip.error = e  # its fields read None below and count the error
        channels = self.channels
        kinds = self._kind
        for i in range(len(channels)):
            ch = channels[i]
            try:
                value = ch.read()
            except OSError as e:
                self._failed(i, e.errno, e)
                continue
            if value is None:
                self._failed(i, ch.fault_kind(), ch)
            else:
                if kinds[i] is not None:
                    self._recovered(i)
                sink(i, value)

    def _failed(self, i, kind, why):
        # `why`: the OSError, or the channel that can say what it read. Words only for a line.
        if kind == OUT_OF_RANGE:
            self.out_of_range[i] += 1
        else:
            self.errors[i] += 1
        self._since[i] += 1
        now = time.ticks_ms()
        if kind != self._kind[i] or time.ticks_diff(now, self._logged[i]) >= _LOG_AGAIN_MS:
            log.error("sensor %s (sensors[%d]): %s (%d failed, %d out of range since boot)",
                      self.names[i], i, str(why) if isinstance(why, OSError) else why.fault_text(),
                      self.errors[i], self.out_of_range[i])
            self._kind[i] = kind
            self._logged[i] = now
            self.news = True

    def _recovered(self, i):
        log.info("sensor %s (sensors[%d]) reads again after %d failures", self.names[i], i,
                 self._since[i])
        self._kind[i] = None
        self._since[i] = 0
        self.news = True

    def errors_total(self):
        """Failed reads summed over all sensors."""
        n = 0
        for e in self.errors:
            n += e
        return n

    def out_of_range_total(self):
        """Readings outside their sensor's range, summed over all sensors."""
        n = 0
        for e in self.out_of_range:
            n += e
        return n

    def failures(self):
        """[(errors, out of range)] per table entry since provisioning: HELLO's section."""
        return [(b[0] + e, b[1] + o)
                for b, e, o in zip(self._before, self.errors, self.out_of_range)]

    def failure_counts(self):
        """{name: [errors, out of range]} since provisioning: what the state file keeps."""
        return {name: list(f) for name, f in zip(self.names, self.failures())}

    def pulse_counts(self):
        """{name: pulses} of the pulse counters: what a new table or the next boot continues."""
        return {pc.name: pc.pulses() for pc in self.pulses}

    def deinit(self):
        """Stop the pulse counters' handlers."""
        for pc in self.pulses:
            pc.deinit()


# ----- the sensor table -----


def check_table(table, i2c=None):
    """ValueError naming the first bad field ("sensors[2].pin: ..."); touches no hardware.

    Everything build_sensors() would refuse is refused here, so that a new table can be
    judged before the old one stops. `i2c` is the config's bus, checked with the table.
    The rules live in node/table.py, imported for the check and dropped after it: a node
    needs them only at boot and when a CONFIG brings a table, and kept they would hold
    about 4 KB of heap for good (their bytecode and texts, unix port).
    """
    import node.table as rules

    try:
        rules.check(table, i2c)
    finally:
        forget("table")


def build_sensors(i2c_factory, table, counts=None, failed=None):
    """A SensorSet for the config's sensor table; ValueError names a bad field.

    i2c_factory() is called once, and only if the table has a BME280. `counts` maps a pulse
    sensor's name to the pulses it continues from, `failed` a sensor's name to the failure
    counts it continues from ([errors, out of range]).
    """
    check_table(table)
    atten = {0: ADC.ATTN_0DB, 2.5: ADC.ATTN_2_5DB, 6: ADC.ATTN_6DB, 11: ADC.ATTN_11DB}
    pulls = {"up": Pin.PULL_UP, "down": Pin.PULL_DOWN, "none": None}
    edges = {"falling": Pin.IRQ_FALLING, "rising": Pin.IRQ_RISING}
    channels = []
    chips = {}
    i2c = None
    try:
        for entry in table:
            kind = entry["kind"]
            if kind == "bme280":
                address = entry.get("address", 0x76)
                chip = chips.get(address)
                if chip is None:
                    if i2c is None:
                        i2c = i2c_factory()
                    chip = chips[address] = BME280(i2c, address)
                channels.append(_Field(chip, _FIELDS.index(entry["field"])))
            elif kind == "adc":
                db = entry.get("atten", 11)
                channels.append(AnalogChannel(entry["pin"], entry.get("scale", 1.0),
                                              entry.get("offset", 0.0), atten[db],
                                              entry.get("samples", 1), _USABLE_MV[db]))
            else:
                name = entry["name"]
                channels.append(PulseCounter(
                    entry["pin"], entry.get("per_pulse", 1.0), pulls[entry.get("pull", "up")],
                    edges[entry.get("edge", "falling")], counts.get(name, 0) if counts else 0,
                    name))
    except BaseException:
        SensorSet(channels, ()).deinit()  # no handler left armed by a half-built table
        raise
    return SensorSet(channels, list(chips.values()), [e["name"] for e in table], failed)
