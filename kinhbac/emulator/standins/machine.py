# Stand-in for the ESP32 port's `machine` module on an emulated board. Behaviour follows the
# ESP32 port's documented API; the hardware behind it lives in the emulator (see _hw.py).
import errno
import random
import struct
import time
import _hw

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

SLEEP = 2
DEEPSLEEP = 4

PIN_WAKE = 2
EXT0_WAKE = 2
EXT1_WAKE = 3
TIMER_WAKE = 4
TOUCHPAD_WAKE = 5
ULP_WAKE = 6

# The ESP32's GPIOs as bit masks (no tables on the heap): the port's pin table has GPIO0-23,
# 25-27 and 32-39 (ports/esp32/machine_pin.h), 34-39 are inputs only, and the ADC reaches
# GPIO0, 2, 4, 12-15, 25-27 and 32-39 (ports/esp32/machine_adc.c).
_GPIO_MASK = 0xFF0EFFFFFF
_ADC_MASK = 0xFF0E00F015
_FIRST_INPUT_ONLY = 34

# Per GPIO: the pull resistor in use (0 none, else Pin.PULL_UP / PULL_DOWN), kept per pin as
# the chip's pad registers are, not per Pin object.
_pulls = bytearray(40)
_ADC_READ_KIND = (b"\x00", b"\x01", b"\x02")  # read, read_u16, read_uv

_reset_cause = int(_hw.env("RESET_CAUSE", "1"))
_unique_id = bytes.fromhex(_hw.env("MAC", "240ac4000001"))


def reset_cause():
    return _reset_cause


def wake_reason():
    return TIMER_WAKE if _reset_cause == DEEPSLEEP_RESET else 0


def unique_id():
    return _unique_id


def freq(hz=None):
    return 160000000 if hz is None else None


def idle():
    time.sleep_ms(1)


def disable_irq():
    return 0


def enable_irq(state):
    pass


def _halt():
    # The emulator stops this process; until it does, nothing else may run.
    while True:
        time.sleep_ms(1000)


def reset():
    _hw.call(_hw.OP_RESET, HARD_RESET)
    _halt()


def soft_reset(retval=None):
    # The port's soft_reset is sys.exit, hence the optional argument it ignores.
    _hw.call(_hw.OP_RESET, SOFT_RESET)
    _halt()


def deepsleep(time_ms=0):
    _hw.call(_hw.OP_DEEPSLEEP, 0, struct.pack("<I", time_ms))
    _halt()


def lightsleep(time_ms=0):
    time.sleep_ms(time_ms)


sleep = lightsleep


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=None, pull=-1, *, value=None, drive=None, hold=None):
        if isinstance(id, Pin):
            id = id._id
        if not isinstance(id, int) or not 0 <= id < 40 or not _GPIO_MASK >> id & 1:
            raise ValueError("invalid pin")
        self._id = id
        self._trigger = 0
        self.init(mode, pull, value=value, drive=drive, hold=hold)

    def init(self, mode=None, pull=-1, *, value=None, drive=None, hold=None):
        # drive and hold set pad strength and hold: nothing the emulator models.
        if mode is not None:
            if mode & 2:  # GPIO_MODE_DEF_OUTPUT
                if self._id >= _FIRST_INPUT_ONLY:
                    raise ValueError("pin can only be input")
                if _hw.pin_levels[self._id] == _hw._UNDRIVEN:
                    _hw.pin_levels[self._id] = 0  # an output starts low
        if pull != -1:
            # GPIO34-39 have no pull resistors: ESP-IDF's gpio_pullup_en() finds no pull bits
            # for their RTC pads (soc/esp32/rtc_io_periph.c) and does nothing, and the port
            # does not look (ports/esp32/machine_pin.c:199-214). The request is ignored.
            if self._id < _FIRST_INPUT_ONLY:
                _pulls[self._id] = pull or 0
        if value is not None:
            self.value(value)

    def value(self, v=None):
        if v is None:
            level = _hw.pin_levels[self._id]
            if level != _hw._UNDRIVEN:
                return level  # what drives the pin: a device model, or the pin's own output
            pull = _pulls[self._id]
            if pull:
                return 1 if pull == Pin.PULL_UP else 0
            return random.getrandbits(1)  # floating: an undriven input without a pull
        level = 1 if v else 0
        _hw.pin_levels[self._id] = level
        _hw.call(_hw.OP_PIN_WRITE, self._id, b"\x01" if level else b"\x00")

    def __call__(self, v=None):
        return self.value(v)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=3, wake=None):
        # No `hard`: the ESP32 port runs every pin handler through micropython.schedule.
        self._trigger = trigger if handler else 0
        _hw.set_irq(self._id, self, handler)
        _hw.call(_hw.OP_PIN_IRQ, self._id, bytes((self._trigger,)))

    def __repr__(self):
        return "Pin(%d)" % self._id


class Signal:
    def __init__(self, pin, invert=False):
        self._pin = pin
        self._invert = invert

    def value(self, v=None):
        if v is None:
            return self._pin.value() ^ self._invert
        self._pin.value((1 if v else 0) ^ self._invert)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)


def _pin_id(pin):
    return pin._id if isinstance(pin, Pin) else Pin(pin)._id


class I2C:
    """A hardware I2C bus; each transaction goes to the device models wired to it."""

    def __init__(self, id, *, scl=None, sda=None, freq=400000, timeout=50000):
        if id not in (0, 1):
            raise ValueError("I2C(%d) doesn't exist" % id)
        self._bus = id
        self._prefix = bytearray(1)
        self._timeout(timeout)

    def _timeout(self, us):
        # How long a transaction waits on a bus that a device holds: the emulator applies it.
        _hw.call(_hw.OP_I2C_INIT, self._bus, struct.pack("<I", us))

    def init(self, *args, **kwargs):
        pass

    def _addr(self, addr):
        return (self._bus << 8) | addr

    def scan(self):
        return list(_hw.call(_hw.OP_I2C_SCAN, self._bus))

    def writeto(self, addr, buf, stop=True):
        _hw.call(_hw.OP_I2C_WRITE, self._addr(addr), buf)
        return len(buf)

    def readfrom_into(self, addr, buf, stop=True):
        data = _hw.call(_hw.OP_I2C_READ, self._addr(addr), struct.pack("<H", len(buf)))
        buf[:] = data

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        self.readfrom_into(addr, buf)
        return bytes(buf)

    # The port's C names the third argument of the *_mem methods "arg" (extmod/machine_i2c.c),
    # so that is the keyword it takes, not "buf" or "nbytes".
    def writeto_mem(self, addr, memaddr, arg, *, addrsize=8):
        self.writeto(addr, bytes((memaddr,)) + bytes(arg))

    def readfrom_mem_into(self, addr, memaddr, arg, *, addrsize=8):
        self._prefix[0] = memaddr
        self.writeto(addr, self._prefix, False)
        self.readfrom_into(addr, arg)

    def readfrom_mem(self, addr, memaddr, arg, *, addrsize=8):
        buf = bytearray(arg)
        self.readfrom_mem_into(addr, memaddr, buf)
        return bytes(buf)


class SoftI2C(I2C):
    """A bit-banged bus on any two pins; the emulator wires it to bus 0's devices (bit 7 of the
    bus number tells it the bus is a SoftI2C, with its own timeout)."""

    def __init__(self, scl, sda, *, freq=400000, timeout=50000):
        _pin_id(scl)  # a wrong pin fails as on the port
        _pin_id(sda)
        self._bus = 0x80
        self._prefix = bytearray(1)
        self._timeout(timeout)


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_9BIT = 9
    WIDTH_10BIT = 10
    WIDTH_11BIT = 11
    WIDTH_12BIT = 12

    def __init__(self, pin, *, atten=None):
        self._pin = _pin_id(pin)
        if not _ADC_MASK >> self._pin & 1:
            raise ValueError("invalid pin")
        self.init(atten=atten)

    def init(self, *, atten=None):
        if atten is not None:
            self.atten(atten)

    def atten(self, atten):
        if not 0 <= atten <= 3:
            raise ValueError("invalid atten")
        _hw.call(_hw.OP_ADC_ATTEN, self._pin, bytes((atten,)))

    def width(self, bits):
        pass

    def _read(self, kind):
        try:
            reply = _hw.call(_hw.OP_ADC_READ, self._pin, _ADC_READ_KIND[kind])
        except OSError as e:
            if e.errno == errno.ETIMEDOUT:
                # ADC2 while WiFi holds it: ESP-IDF's adc2_get_raw() returns ESP_ERR_TIMEOUT,
                # which the port's check_esp_err() raises with its name (mphalport.c:64-104).
                raise OSError(errno.ETIMEDOUT, "ESP_ERR_TIMEOUT")
            raise
        return struct.unpack("<I", reply)[0]

    def read(self):
        return self._read(0)

    def read_u16(self):
        return self._read(1)

    def read_uv(self):
        return self._read(2)


class WDT:
    """The task watchdog: once started it cannot be stopped, and the emulator enforces it."""

    def __init__(self, id=0, timeout=5000):
        if id != 0:
            raise ValueError()
        if timeout <= 0:  # any positive timeout: ESP-IDF's task watchdog counts in ms
            raise ValueError("WDT timeout too short")
        _hw.call(_hw.OP_WDT_START, 0, struct.pack("<I", timeout))

    def feed(self):
        _hw.call(_hw.OP_WDT_FEED)


class RTC:
    _MEMORY_SIZE = 2048

    def __init__(self):
        pass

    def init(self, date):
        self.datetime(date)

    def datetime(self, dt=None):
        # (year, month, day, weekday, hours, minutes, seconds, microseconds), from the RTC the
        # emulator keeps: 2000-01-01 00:00 at power-on, running on across resets and deep sleep
        # (ports/esp32/machine_rtc.c:104-140).
        if dt is None:
            ns = time.time_ns()
            t = time.gmtime(ns // 1000000000)
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], ns // 1000 % 1000000)
        if len(dt) != 8:
            raise ValueError("requested length 8 but object has length %d" % len(dt))
        secs = time.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0))
        offset = time._set_rtc_ns(secs * 1000000000 + dt[7] * 1000)
        _hw.call(_hw.OP_RTC_SET, 0, struct.pack("<q", offset))

    def memory(self, data=None):
        if data is None:
            return bytes(_hw.call(_hw.OP_RTC_MEM_READ))
        if len(data) > self._MEMORY_SIZE:
            raise ValueError("buffer too long")
        _hw.call(_hw.OP_RTC_MEM_WRITE, 0, data)
