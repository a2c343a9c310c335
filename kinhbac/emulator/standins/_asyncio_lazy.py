# `asyncio` on an emulated board until the firmware first uses it; then the unix port's own
# (frozen) asyncio, imported with the unix port's `time`.
#
# The board's `time` is a stand-in whose ticks wrap at 2**30 as the ESP32's do (standins/
# time.py). asyncio's scheduler is C here (_asyncio's TaskQueue, as on a chip) and reads the
# unix port's ticks itself, which never wrap; given the stand-in's ticks as well it would
# compare the two and sleep for the wrong time. So asyncio keeps the unix port's ticks, the
# firmware's own ticks arithmetic meets the wrap, and asyncio's handling of it is not
# exercised (docs/emulator.md). The import happens on first use, so its heap is the
# firmware's, as on a chip; the firmware's `select` is the stand-in whose poll runs pin handlers.
import sys

_real = None


def _load():
    global _real
    if _real is None:
        mods = sys.modules
        lazy = mods.pop("asyncio")
        board_time = mods["time"]
        import utime

        mods["time"] = utime
        try:
            import asyncio

            _real = asyncio
        except BaseException:  # noqa: B036 (put the module back whatever stopped the import)
            mods["asyncio"] = lazy
            raise
        finally:
            mods["time"] = board_time
    return _real


def __getattr__(name):
    value = getattr(_load(), name)
    globals()[name] = value  # found directly next time
    return value
