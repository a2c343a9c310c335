# RTC memory: what outlives machine.reset(), a watchdog reset and deep sleep, but not a power
# cut (machine.RTC().memory(): 2048 bytes on the ESP32). The port replaces the whole memory at
# every write, so this module keeps one image of it and writes every part back together:
#
#   0   deep-sleep cycle (31 bytes): magic "KB", boot, next seq, last uplink counter, boot ms
#       at the wake, clock offset, synced
#   32  pulse totals: magic "PC", n, then n x (name key, wraps, count): each pulse sensor's
#       count as PulseCounter keeps it (pulses = wraps * PULSE_WRAP + count)
#
# Each part has its own magic, so one can be valid without the other. The pulse part is
# written whenever a count moved (at most every housekeeping tick, 250 ms): a watchdog reset
# or a crash loses at most that quarter second of pulses.
import hashlib
import struct
import machine
from micropython import const

from node.sensors import PULSE_WRAP

_SLEEP_MAGIC = const(0x4B42)  # "KB"
_SLEEP_FMT = "<HIIIQqB"  # magic, boot, next seq, last uplink counter, boot ms, offset, synced
_PULSE_AT = const(32)
_PULSE_MAGIC = const(0x4350)  # "PC"
_PULSE_HEAD = const(3)  # magic u16, n u8
_SLOT = "<III"  # name key, wraps, count
_SLOT_SIZE = const(12)


def name_key(name):
    """A pulse sensor's name as 30 bits (a small int on the ESP32): its slot's key."""
    return struct.unpack("<I", hashlib.sha256(name.encode()).digest())[0] & 0x3FFFFFFF


class RtcMemory:
    def __init__(self):
        self._rtc = machine.RTC()
        self._saved = self._rtc.memory()  # what the last run left, read once
        # Until a part is replaced, a write carries what the last run left in it.
        self._image = bytearray(max(len(self._saved), _PULSE_AT + _PULSE_HEAD))
        self._image[:len(self._saved)] = self._saved
        self._counters = None
        self._last = []  # wraps, count of each counter as last written

    # ----- deep sleep -----

    def load_sleep(self):
        """(boot, seq, counter, boot ms, offset) saved before a deep sleep, or None."""
        if machine.reset_cause() != machine.DEEPSLEEP_RESET:
            return None
        raw = self._saved
        if len(raw) < struct.calcsize(_SLEEP_FMT):
            return None
        magic, boot, seq, counter, ms, offset, synced = struct.unpack_from(_SLEEP_FMT, raw, 0)
        if magic != _SLEEP_MAGIC:
            return None
        return boot, seq, counter, ms, offset if synced else None

    def save_sleep(self, boot, seq, counter, ms, offset):
        synced = offset is not None
        struct.pack_into(_SLEEP_FMT, self._image, 0, _SLEEP_MAGIC, boot, seq, counter, ms,
                         offset if synced else 0, synced)
        self._rtc.memory(self._image)

    # ----- pulse totals -----

    def pulses(self):
        """{name key: pulses} saved by the last run, or {} (power-on, or none saved)."""
        raw = self._saved
        if len(raw) < _PULSE_AT + _PULSE_HEAD:
            return {}
        magic, n = struct.unpack_from("<HB", raw, _PULSE_AT)
        if magic != _PULSE_MAGIC or len(raw) < _PULSE_AT + _PULSE_HEAD + n * _SLOT_SIZE:
            return {}
        found = {}
        for i in range(n):
            key, wraps, count = struct.unpack_from(_SLOT, raw, _PULSE_AT + _PULSE_HEAD
                                                   + i * _SLOT_SIZE)
            found[key] = wraps * PULSE_WRAP + count
        return found

    def save_pulses(self, counters):
        """Write the pulse counters' counts when one moved; allocates only for a new table."""
        if counters is not self._counters:
            self._adopt(counters)
        last = self._last
        image = self._image
        moved = False
        for i in range(len(counters)):
            pc = counters[i]
            w = pc._wraps
            c = pc._count
            if w != pc._wraps:  # a wrap landed between the two loads: the next tick has it
                continue
            if w != last[2 * i] or c != last[2 * i + 1]:
                last[2 * i] = w
                last[2 * i + 1] = c
                at = _PULSE_AT + _PULSE_HEAD + i * _SLOT_SIZE + 4
                struct.pack_into("<II", image, at, w, c)
                moved = True
        if moved:
            self._rtc.memory(image)
        return moved

    def _adopt(self, counters):
        # A new sensor table: a new pulse part (the deep-sleep part is kept).
        n = len(counters)
        image = bytearray(_PULSE_AT + _PULSE_HEAD + n * _SLOT_SIZE)
        image[:_PULSE_AT] = self._image[:_PULSE_AT]
        struct.pack_into("<HB", image, _PULSE_AT, _PULSE_MAGIC, n)
        for i in range(n):
            struct.pack_into(_SLOT, image, _PULSE_AT + _PULSE_HEAD + i * _SLOT_SIZE,
                             name_key(counters[i].name), 0, 0)
        self._image = image
        self._counters = counters
        self._last = [-1] * (2 * n)  # nothing written yet: the first save writes every slot
