# Stand-in for the ESP32 port's `machine` module on an emulated board. Behaviour follows the
# ESP32 port's documented API; the hardware behind it lives in the emulator (see _hw.py).
import struct
import time
import _hw

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

PIN_WAKE = 2
EXT0_WAKE = 2
TIMER_WAKE = 4

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


def enable_irq(state=0):
    pass


def _halt():
    # The emulator stops this process; until it does, nothing else may run.
    while True:
        time.sleep_ms(1000)


def reset():
    _hw.call(_hw.OP_RESET, HARD_RESET)
    _halt()


def soft_reset():
    _hw.call(_hw.OP_RESET, SOFT_RESET)
    _halt()


def deepsleep(time_ms=0):
    _hw.call(_hw.OP_DEEPSLEEP, 0, struct.pack("<I", time_ms))
    _halt()


def lightsleep(time_ms=0):
    time.sleep_ms(time_ms)


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, *, value=None):
        self.id = id
        self._trigger = 0
        self.init(mode, pull, value=value)

    def init(self, mode=-1, pull=-1, *, value=None):
        if mode != -1:
            self._mode = mode
        if pull != -1:
            self._pull = pull
            if self.id not in _hw.pin_levels:
                _hw.pin_levels[self.id] = 1 if pull == Pin.PULL_UP else 0
        if value is not None:
            self.value(value)

    def value(self, v=None):
        if v is None:
            return _hw.pin_levels.get(self.id, 0)
        level = 1 if v else 0
        _hw.pin_levels[self.id] = level
        _hw.call(_hw.OP_PIN_WRITE, self.id, b"\x01" if level else b"\x00")

    def __call__(self, v=None):
        return self.value(v)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=3, *, wake=None, hard=False):
        self._trigger = trigger if handler else 0
        _hw.set_irq(self.id, self, handler, hard)
        _hw.call(_hw.OP_PIN_IRQ, self.id, bytes((self._trigger,)))

    def __repr__(self):
        return "Pin(%d)" % self.id


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
    return pin.id if isinstance(pin, Pin) else pin


class I2C:
    """A hardware I2C bus; each transaction goes to the device models wired to it."""

    def __init__(self, id=0, *, scl=None, sda=None, freq=400000, timeout=50000):
        self._bus = id
        self._prefix = bytearray(1)

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

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        self.writeto(addr, bytes((memaddr,)) + bytes(buf))

    def readfrom_mem_into(self, addr, memaddr, buf, *, addrsize=8):
        self._prefix[0] = memaddr
        self.writeto(addr, self._prefix, False)
        self.readfrom_into(addr, buf)

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        buf = bytearray(nbytes)
        self.readfrom_mem_into(addr, memaddr, buf)
        return bytes(buf)


SoftI2C = I2C


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
        if atten is not None:
            self.atten(atten)

    def atten(self, atten):
        _hw.call(_hw.OP_ADC_ATTEN, self._pin, bytes((atten,)))

    def width(self, bits):
        pass

    def _read(self, kind):
        return struct.unpack("<I", _hw.call(_hw.OP_ADC_READ, self._pin, bytes((kind,))))[0]

    def read(self):
        return self._read(0)

    def read_u16(self):
        return self._read(1)

    def read_uv(self):
        return self._read(2)


class WDT:
    """The task watchdog: once started it cannot be stopped, and the emulator enforces it."""

    def __init__(self, id=0, timeout=5000):
        if timeout < 1000:
            raise ValueError("WDT timeout too short: the ESP32 minimum is 1000 ms")
        _hw.call(_hw.OP_WDT_START, 0, struct.pack("<I", timeout))

    def feed(self):
        _hw.call(_hw.OP_WDT_FEED)


class RTC:
    _MEMORY_SIZE = 2048

    def __init__(self, id=0):
        pass

    def datetime(self, dt=None):
        if dt is None:
            t = time.localtime()
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0)
        # The host's clock is already right; the firmware's own clock offset is what counts.
        return None

    def memory(self, data=None):
        if data is None:
            return bytes(_hw.call(_hw.OP_RTC_MEM_READ))
        if len(data) > self._MEMORY_SIZE:
            raise ValueError("RTC memory holds at most 2048 bytes")
        _hw.call(_hw.OP_RTC_MEM_WRITE, 0, data)
