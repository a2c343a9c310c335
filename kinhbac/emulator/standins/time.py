# Stand-in for the ESP32 port's `time` on an emulated board: its ticks and its clock.
#
# Ticks: the port's ticks_ms/us are esp_timer_get_time() since boot, ticks_cpu the CPU's cycle
# counter (160 MHz), each masked to MICROPY_PY_TIME_TICKS_PERIOD, 2**30 on the 32-bit ESP32
# (31-bit small ints; py/mpconfig.h, extmod/modtime.c): ticks_ms wraps every 12.4 days,
# ticks_us every 17.9 minutes, ticks_cpu every 6.7 s. The unix port's period is 2**62, so
# ticks_diff and ticks_add are redone here with the ESP32's. A board can start its count
# shortly before the wrap (KINHBAC_TICKS_START_MS, board.ticks_start_ms).
#
# Clock: time() and friends read the board's RTC in seconds since 2000-01-01, the ESP32 port's
# epoch at v1.24.1 (no MICROPY_EPOCH_IS_1970 in ports/esp32; timeutils.h), as an int; the RTC
# starts at 2000-01-01 00:00 at power-on and runs on across resets and deep sleep (the emulator
# keeps it: KINHBAC_RTC_OFFSET_NS). No time zone: localtime() is gmtime(), as on the port.
import os
import utime
from micropython import const
from utime import sleep, sleep_ms, sleep_us  # noqa: F401

_PERIOD = const(0x40000000)
_MASK = const(0x3FFFFFFF)
_HALF = const(0x20000000)
_CPU_MHZ = const(160)  # machine.freq() of ESP32_GENERIC
_SECONDS_1970_TO_2000 = const(946684800)  # TIMEUTILS_SECONDS_1970_TO_2000
_NS = const(1000000000)


# Microseconds since this board's boot = the unix port's ticks_us + _us_offset.
_us_offset = int(os.getenv("KINHBAC_TICKS_START_MS") or 0) * 1000 - utime.ticks_us()
# The RTC's nanoseconds since 2000 = the host's time_ns() + _rtc_offset; without an emulator
# (the factory tool) it reads 2000-01-01 00:00 now.
_rtc_offset = int(os.getenv("KINHBAC_RTC_OFFSET_NS") or -utime.time_ns())


def ticks_ms():
    return ((utime.ticks_us() + _us_offset) // 1000) & _MASK


def ticks_us():
    return (utime.ticks_us() + _us_offset) & _MASK


def ticks_cpu():
    return ((utime.ticks_us() + _us_offset) * _CPU_MHZ) & _MASK


def ticks_diff(ticks1, ticks2):
    return ((ticks1 - ticks2 + _HALF) & _MASK) - _HALF


def ticks_add(ticks, delta):
    if not -_HALF < delta < _HALF:
        raise OverflowError("ticks interval overflow")
    return (ticks + delta) & _MASK


def time_ns():
    return utime.time_ns() + _rtc_offset


def time():
    return (utime.time_ns() + _rtc_offset) // _NS


def gmtime(secs=None):
    if secs is None:
        secs = time()
    return utime.gmtime(secs + _SECONDS_1970_TO_2000)[:8]


localtime = gmtime


def mktime(t):
    # The board runs with TZ=UTC0, so the unix port's mktime() is the port's timeutils_mktime()
    # (out-of-range fields roll over) with the 1970 epoch.
    return utime.mktime(t) - _SECONDS_1970_TO_2000


def _set_rtc_ns(ns):
    """Set the RTC (machine.RTC().datetime(...)); returns the offset the emulator keeps."""
    global _rtc_offset
    _rtc_offset = ns - utime.time_ns()
    return _rtc_offset
