"""Measure how many heap bytes the 64-bit MicroPython unix port needs per byte of a 32-bit one.

Emulated boards run the firmware under the unix port with `-X heapsize=` set to an ESP32's
heap times this factor. An ESP32 cannot run here, so the 32-bit side is MicroPython's
webassembly port (wasm32: 4-byte pointers and words, like the ESP32's Xtensa), from the npm
package in bench/package.json, run by Node through bench/heap_factor.mjs. Both interpreters
run the same workload (bench/heap_workload.py); this script compares the two, prints a table
and writes bench/HEAP_FACTOR.md.

Usage, from the repository root:  python -m bench.heap_factor [--no-write] [--reps N]
Needs: the micropython binary (the emulator extra, or $KINHBAC_MICROPYTHON), Node.js, and
`cd bench && npm ci` once.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kinhbac.emulator import interpreter

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORKLOAD = BENCH / "heap_workload.py"
RUNNER = BENCH / "heap_factor.mjs"
WIRE = REPO / "kinhbac" / "wire.py"
REPORT = BENCH / "HEAP_FACTOR.md"
WASM_PACKAGE = "@micropython/micropython-webassembly-pyscript"
WASM_PACKAGE_DIR = BENCH / "node_modules" / WASM_PACKAGE
NPM_HINT = "run `cd bench && npm ci` (needs Node.js 18+ and npm)"
MOD_PREFIX = "hf_mod50_"  # the workload imports hf_mod50_0 .. hf_mod50_{MOD_COUNT-1}
MOD_COUNT = 8
TIMEOUT_S = 300

# A node's resident state, as counts of each measured pattern: the weights of the headline
# factor. Rows not named here (the probes and the flat-ring alternative) weigh nothing.
FIRMWARE_MIX = {
    "import 8 x 50-line module": 1,  # the application's own modules, loaded as .py
    "import wire": 1,
    "wire: Key + ReadingsWriter": 1,
    "wire: decoded ACK + guard": 1,
    "ring: 1000 x bytearray(16)": 1,  # the readings backlog
    "json.loads config (329 B)": 1,
    "list of 100 floats": 1,  # a window of recent readings
    "dict str->int, 10 (literal keys)": 4,
    "dict str->int, 10 (runtime keys)": 2,
    "dict str->int, 100 (runtime keys)": 1,
    "bytearray(1024)": 2,  # rx and tx buffers
    "bytearray(64)": 4,
    "class instance, 4 attrs x100": 0.2,  # about 20 objects: drivers, sensors, tasks
    "tuple of 3 ints x100": 0.5,
    "short str x100": 0.5,
    "short bytes x100": 0.2,
    "struct.pack result x100": 0.1,
    "exception object": 1,
    "closure x10": 1,
    "epoch-second int x100": 0.1,
}
PROBES = ("one float", "bytearray(1)")

# A ~50-line module in the style of the firmware's own: constants, a class, a few functions.
# Copy i has "@" replaced by i, so that each copy brings its own top-level names (interned
# strings cost heap too) while attribute names repeat, as they do across real modules.
MODULE_SOURCE = """\
# Sensor sampling: a small module of the size the firmware is made of.
import struct

SAMPLE_MS@ = 5000
MAX_BACKLOG@ = 1000
KINDS@ = ("temp", "rh", "pm25", "co2")
SCALES@ = {"temp": 0.01, "rh": 0.1, "pm25": 1, "co2": 1}
_RECORD@ = "<IIfB"


class Sensor@:
    def __init__(self, index, kind, pin):
        self.index = index
        self.kind = kind
        self.pin = pin
        self.errors = 0
        self.last = None

    def scale(self):
        return SCALES@.get(self.kind, 1)

    def convert(self, raw):
        if raw is None:
            self.errors += 1
            return None
        value = raw * self.scale()
        self.last = value
        return value

    def __repr__(self):
        return "Sensor(%d, %s, pin %d)" % (self.index, self.kind, self.pin)


def make_sensors@(config):
    out = []
    for item in config.get("sensors", ()):
        kind = item.get("kind", "temp")
        if kind not in KINDS@:
            raise ValueError("unknown sensor kind " + kind)
        out.append(Sensor@(item["id"], kind, item.get("pin", 0)))
    return out


def pack_record@(buf, seq, t, value, index):
    struct.pack_into(_RECORD@, buf, 0, seq, t, value, index)


def unpack_record@(buf):
    return struct.unpack_from(_RECORD@, buf, 0)


def due@(now_ms, last_ms):
    return now_ms - last_ms >= SAMPLE_MS@
"""


class SetupError(RuntimeError):
    """A tool or package this measurement needs is missing."""


@dataclass
class Run:
    rows: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    skips: dict[str, str] = field(default_factory=dict)


# ---- Finding the tools --------------------------------------------------------------------------


def find_micropython() -> str:
    """The emulator's micropython lookup, with its error turned into a setup error here."""
    try:
        return interpreter.find_micropython()
    except interpreter.MicroPythonNotFound as exc:
        raise SetupError(str(exc)) from exc


def find_node() -> str:
    node = shutil.which("node")
    if not node:
        raise SetupError(
            f"Node.js (`node`) is not on PATH: install Node.js and npm, then {NPM_HINT}"
        )
    if not shutil.which("npm"):
        raise SetupError(f"npm is not on PATH: install npm, then {NPM_HINT}")
    if not (WASM_PACKAGE_DIR / "package.json").is_file():
        raise SetupError(f"the npm package {WASM_PACKAGE} is not installed: {NPM_HINT}")
    return node


def wasm_package_version() -> str:
    return json.loads((WASM_PACKAGE_DIR / "package.json").read_text())["version"]


# ---- Docstrings ------------------------------------------------------------------------------


def strip_docstrings(source: str) -> tuple[str, int]:
    """source with module, class and function docstrings made `pass`, line numbers kept.

    The webassembly build keeps module and class docstrings as __doc__ strings on its heap
    (MICROPY_ENABLE_DOC_STRING); the unix port and the ESP32 port drop them at compile time.
    Both interpreters get the stripped source, so they compile the same code and neither
    carries docstrings. Returns the new source and how many docstrings were replaced.
    """
    lines = source.splitlines(keepends=True)
    spans = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = node.body[0] if node.body else None
        if not (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            continue
        start, end = first.lineno - 1, first.end_lineno - 1
        # ast's column offsets count UTF-8 bytes
        before = lines[start].encode()[: first.col_offset].decode()
        after = lines[end].encode()[first.end_col_offset :].decode()
        if before.strip() or after.strip().lstrip(";").strip():
            continue  # shares its line with other code: leave it
        spans.append((start, end, before))
    for start, end, indent in sorted(spans, reverse=True):
        lines[start : end + 1] = [indent + "pass\n"] + ["\n"] * (end - start)
    return "".join(lines), len(spans)


# ---- Running the workload -----------------------------------------------------------------------


def prelude(reps: int, moddir: str | None, wire_dir: str | None) -> str:
    return (
        f"REPS = {reps}\nMODDIR = {moddir!r}\nMOD_PREFIX = {MOD_PREFIX!r}\n"
        f"MOD_COUNT = {MOD_COUNT}\nWIRE_DIR = {wire_dir!r}\n"
    )


def parse(output: str, who: str) -> Run:
    run = Run()
    done = False
    for line in output.splitlines():
        parts = line.split("|")
        if parts[0] == "ROW" and len(parts) == 4:
            run.rows[parts[1]] = int(parts[2])
            run.notes[parts[1]] = parts[3]
        elif parts[0] == "INFO" and len(parts) == 3:
            run.info[parts[1]] = parts[2]
        elif parts[0] == "SKIP" and len(parts) == 3:
            run.skips[parts[1]] = parts[2]
        elif line == "DONE":
            done = True
    if not done:
        raise RuntimeError(f"the {who} run did not finish:\n{output}")
    return run


def checked(proc: subprocess.CompletedProcess, who: str) -> str:
    if proc.returncode != 0:
        raise RuntimeError(
            f"the {who} run failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def run_unix(micropython: str, workdir: Path, reps: int, wire: bool) -> Run:
    moddir = workdir / "mod"
    script = workdir / "unix_workload.py"
    wire_dir = str(workdir / "wire") if wire else None
    script.write_text(prelude(reps, str(moddir), wire_dir) + WORKLOAD.read_text())
    proc = subprocess.run(
        [micropython, str(script)],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT_S,
    )
    return parse(checked(proc, "unix-port"), "unix-port")


def run_wasm(node: str, workdir: Path, reps: int, wire: bool) -> Run:
    script = workdir / "wasm_workload.py"
    script.write_text(prelude(reps, "/hf", "/kinhbac" if wire else None) + WORKLOAD.read_text())
    cmd = [node, str(RUNNER), str(script), "--step"]
    for i in range(MOD_COUNT):
        name = f"{MOD_PREFIX}{i}.py"
        cmd += ["--put", f"{workdir / 'mod' / name}=/hf/{name}"]
    if wire:
        cmd += ["--put", f"{workdir / 'wire' / 'wire.py'}=/kinhbac/wire.py"]
    proc = subprocess.run(
        cmd, cwd=BENCH, capture_output=True, text=True, check=False, timeout=TIMEOUT_S
    )
    if proc.returncode == 3:
        raise SetupError(proc.stderr.strip())
    return parse(checked(proc, "webassembly-port"), "webassembly-port")


def wire_usable(micropython: str, workdir: Path) -> tuple[bool, str]:
    """Whether kinhbac/wire.py exists and imports under the unix port as `wire`."""
    if not WIRE.is_file():
        return False, "kinhbac/wire.py does not exist"
    proc = subprocess.run(
        [micropython, "-c", "import wire"],
        cwd=workdir,
        env={**os.environ, "MICROPYPATH": str(WIRE.parent)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return False, f"kinhbac/wire.py does not import under MicroPython: {last}"
    return True, ""


# ---- The -X heapsize= check ---------------------------------------------------------------------

CAP_WORKLOAD = """\
import gc
start = gc.mem_alloc()
ring = [bytearray(16) for _ in range(1000)]
conf = {"k%d" % i: i for i in range(100)}
window = [i * 0.5 for i in range(100)]
gc.collect()
print("OK", start, gc.mem_alloc(), gc.mem_alloc() + gc.mem_free())
"""


def heapsize_check(micropython: str, workdir: Path) -> dict:
    """Smallest -X heapsize= (to 256 bytes) at which CAP_WORKLOAD runs, by bisection."""
    script = workdir / "cap_workload.py"
    script.write_text(CAP_WORKLOAD)

    def attempt(n: int) -> str | None:
        proc = subprocess.run(
            [micropython, "-X", f"heapsize={n}", str(script)],
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if proc.returncode == 0 and proc.stdout.startswith("OK"):
            return proc.stdout.strip()
        return None

    roomy = 4 * 1024 * 1024
    first = attempt(roomy)
    if first is None:
        raise RuntimeError(f"the -X heapsize check fails even at {roomy} bytes")
    _, start, live, usable = first.split()
    low, high = 1024, roomy  # low fails (or is untried-small), high passes
    tries = 1
    while high - low > 256:
        mid = (low + high) // 2
        tries += 1
        if attempt(mid) is None:
            low = mid
        else:
            high = mid
    # The unix port prints an uncaught exception's traceback on stdout.
    proc = subprocess.run(
        [micropython, "-X", f"heapsize={low}", str(script)],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    said = (proc.stdout + proc.stderr).strip().splitlines()
    failed_msg = next((ln for ln in reversed(said) if "Error" in ln), said[-1] if said else "")
    at_min = attempt(high)
    usable_at_min = int(at_min.split()[3]) if at_min else 0
    return {
        "min_heapsize": high,
        "fails_at": low,
        "fail_message": failed_msg,
        "live_after_workload": int(live),
        "live_at_start": int(start),
        "usable_at_4MiB": int(usable),
        "usable_at_min": usable_at_min,
        "tries": tries,
    }


# ---- Arithmetic and reporting -------------------------------------------------------------------


def ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def summarise(unix: Run, wasm: Run) -> dict:
    names = [n for n in unix.rows if n in wasm.rows]
    ratios = {n: ratio(unix.rows[n], wasm.rows[n]) for n in names}
    measured = [n for n in names if n not in PROBES]
    weighted = [n for n in names if FIRMWARE_MIX.get(n)]
    mix_unix = sum(FIRMWARE_MIX[n] * unix.rows[n] for n in weighted)
    mix_wasm = sum(FIRMWARE_MIX[n] * wasm.rows[n] for n in weighted)
    sum_unix = sum(unix.rows[n] for n in measured)
    sum_wasm = sum(wasm.rows[n] for n in measured)
    finite = {n: r for n, r in ratios.items() if r is not None and n in measured}
    lo = min(finite, key=finite.get)
    hi = max(finite, key=finite.get)
    return {
        "names": names,
        "ratios": ratios,
        "factor": mix_unix / mix_wasm,
        "mix_unix": mix_unix,
        "mix_wasm": mix_wasm,
        "weighted": weighted,
        "unweighted": sum_unix / sum_wasm,
        "min": (lo, finite[lo]),
        "max": (hi, finite[hi]),
        "block_unix": unix.rows.get("one float"),
        "block_wasm": wasm.rows.get("one float"),
        "gcd_unix": math.gcd(*unix.rows.values()),
        "gcd_wasm": math.gcd(*wasm.rows.values()),
    }


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def table_lines(unix: Run, wasm: Run, s: dict, markdown: bool) -> list[str]:
    head = ("pattern", "unix 64-bit B", "wasm32 B", "ratio", "mix weight")
    body = []
    for n in s["names"]:
        w = FIRMWARE_MIX.get(n, 0)
        body.append(
            (
                n,
                f"{unix.rows[n]:,}",
                f"{wasm.rows[n]:,}",
                fmt_ratio(s["ratios"][n]),
                f"{w:g}" if w else "-",
            )
        )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * 4]
        out += ["| " + " | ".join(r) + " |" for r in body]
        return out
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(5)]

    def line(r: tuple) -> str:
        return "  ".join(
            str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r)
        )

    return [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in body]


def command_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30).stdout
        return out.strip("\n").rstrip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({' '.join(cmd)} failed: {e})"


def machine_description() -> str:
    keep = ("Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket",
            "Hypervisor vendor", "L2 cache", "L3 cache")  # fmt: skip
    lscpu = [
        ln for ln in command_output(["lscpu"]).splitlines() if ln.split(":")[0].strip() in keep
    ]
    return "\n".join(lscpu) + "\n\n" + command_output(["free", "-h"])


def report(unix: Run, wasm: Run, s: dict, cap: dict, versions: dict, skips: list[str]) -> str:
    lo, hi = s["min"], s["max"]
    mix = ", ".join(f"{FIRMWARE_MIX[n]:g} x {n}" for n in s["weighted"])
    out = [
        "# Heap factor: 64-bit MicroPython unix port vs a 32-bit MicroPython",
        "",
        (
            f"Written by `python -m bench.heap_factor` on {datetime.date.today().isoformat()}; "
            "reproduce with `cd bench && npm ci && cd .. && .venv/bin/python -m bench.heap_factor`."
        ),
        "",
        "## Result",
        "",
        (
            f"- **Factor for `-X heapsize=`: {s['factor']:.2f}** (unix-port heap bytes per 32-bit "
            "heap byte), the ratio of sums over a mix weighted like a node's resident state: "
            f"{s['mix_unix']:,.0f} B on the unix port vs {s['mix_wasm']:,.0f} B on wasm32."
        ),
        f"- Unweighted ratio of sums over all measured patterns: {s['unweighted']:.2f}.",
        f"- Per-pattern ratios range from {lo[1]:.2f} ({lo[0]}) to {hi[1]:.2f} ({hi[0]}).",
        (
            f"- GC block: {s['block_unix']} bytes on the unix port, {s['block_wasm']} bytes on "
            "wasm32 (the smallest allocation, one float, takes one block; the greatest common "
            f"divisor of all the deltas is {s['gcd_unix']} and {s['gcd_wasm']} bytes)."
        ),
        "",
        (
            "A list of 100 floats is 4,256 bytes on the unix port (FACTS.md's 4,288 includes one "
            "more block: the growth of the globals dict when measured at module level)."
        ),
        "",
        (
            "Pointer-made objects (lists, dicts, tuples, instances, strs, closures, code) take 2.0x; "
            "a byte buffer takes its length plus one object header, so large buffers are ~1.0x; "
            "integers from 2**30 to 2**62 (e.g. Unix time in seconds) are free on the unix port but "
            "a heap object on any 32-bit port, the one case where the unix port needs less."
        ),
        "",
        "## Per pattern",
        "",
        (
            "Bytes that stay allocated (gc.mem_alloc() delta with a full collection before and "
            "after), median of the tries; imports are measured on first import only."
        ),
        "",
        *table_lines(unix, wasm, s, markdown=True),
        "",
        f"Mix weights: {mix}.",
        "",
    ]
    if skips:
        out += ["Skipped: " + "; ".join(skips) + ".", ""]
    out += [
        "## Interpreters",
        "",
        (
            f"- 64-bit: MicroPython unix port, `{versions['unix_binary']}`: "
            f"{unix.info.get('version')}; sys.implementation {unix.info.get('implementation')}; "
            f"sys.maxsize {unix.info.get('maxsize')}; small ints up to {unix.info.get('small_int_max')}; "
            f"floats {unix.info.get('float')}; gc.collect() {unix.info.get('gc_collect')}."
        ),
        (
            f"- 32-bit: npm `{WASM_PACKAGE}` {versions['wasm_package']} under Node.js "
            f"{versions['node']}: {wasm.info.get('version')}; sys.implementation "
            f"{wasm.info.get('implementation')}; sys.maxsize {wasm.info.get('maxsize')}; small ints "
            f"up to {wasm.info.get('small_int_max')}; floats {wasm.info.get('float')}; gc.collect() "
            f"{wasm.info.get('gc_collect')}."
        ),
        f"- Host CPython {versions['python']}.",
        "",
        "## How the 32-bit side stands for an ESP32, and caveats",
        "",
        (
            "- Object layout: the ESP32 port (MicroPython's ports/esp32/mpconfigport.h: "
            "MICROPY_OBJ_REPR_A, 32-bit mp_int_t) and the two ports measured here all use "
            "MICROPY_OBJ_REPR_A (31-bit small ints, floats boxed on the heap) and the default GC "
            "block of 4 machine words: 16 bytes on the ESP32 and on wasm32, 32 on the unix port. "
            "Observed here: a float allocates one block on each, sys.maxsize is "
            "2**31-1 on wasm32 (as on an ESP32) and 2**63-1 on the unix port, and small ints stop at "
            "2**30-1 on wasm32 and 2**62-1 on the unix port."
        ),
        (
            "- Floats: the ESP32 port uses single-precision floats (MICROPY_FLOAT_IMPL_FLOAT), both "
            "ports measured here double. A float object is 8 bytes on the ESP32 and 12 (padded to 16) "
            "on wasm32: one 16-byte block either way, so the figures are the same."
        ),
        (
            "- Versions: the unix port is 1.29 (preview), the wasm package 1.27. A one-off run with "
            "the package's 1.29.0-6 build gave the same bytes for every row."
        ),
        (
            "- Docstrings: the wasm build keeps module and class docstrings on the heap "
            "(MICROPY_ENABLE_DOC_STRING); the unix and ESP32 ports drop them. Both interpreters "
            f"therefore import a copy of wire.py with its docstrings made `pass` "
            f"({versions['docstrings_stripped']} of them), line numbers kept; with them, wasm32 "
            "would carry about 3 KB more for wire and the import ratio would read about 1.2."
        ),
        (
            "- Import rows also hold per-function records whose size depends on build options (a "
            "native emitter on unix and ESP32, none on wasm), and the interning of new names, whose "
            "pool growth depends on what was interned before: expect a few percent either way."
        ),
        (
            '- Heap growth: on the wasm "pyscript" variant the heap grows on demand (split heap), '
            "as on an ESP32 since MicroPython 1.21, and gc.collect() runs only when control returns "
            "to JavaScript; the workload is therefore measured in top-level steps there (see "
            "bench/heap_workload.py). The unix port collects at once, scanning its C stack "
            "conservatively; each pattern is the median of several tries."
        ),
        (
            "- Not measured: fragmentation (a real heap fails on the largest free block, not the "
            "total), transient peaks (parsing and compiling a .py import needs far more heap for a "
            "moment than the code it leaves; .mpy or frozen modules avoid both), the C-side state "
            "of ESP-IDF, and what the unix port allocates at start-up that an ESP32 does not."
        ),
        (
            "- The factor depends on what the heap holds: flat byte buffers bring it towards 1.0, "
            "object-rich state towards 2.0 (see the flat-ring row: the same 1,000 records as one "
            "bytearray cost 1.0x, and half the bytes on either port)."
        ),
        "",
        "## `-X heapsize=` caps the unix port's heap",
        "",
        (
            f"A workload of 1,000 bytearray(16) records, a 100-entry dict and 100 floats leaves "
            f"{cap['live_after_workload']:,} bytes allocated. The smallest `-X heapsize=` at which it "
            f"runs is {cap['min_heapsize']:,} bytes (found by bisection to 256 bytes, "
            f"{cap['tries']} runs); at {cap['fails_at']:,} it fails with "
            f"`{cap['fail_message'] or 'a non-zero exit'}`. At the minimum, gc.mem_alloc() + "
            f"gc.mem_free() is {cap['usable_at_min']:,} bytes (at 4 MiB: "
            f"{cap['usable_at_4MiB']:,}): the GC's own tables take "
            f"{1 - cap['usable_at_min'] / cap['min_heapsize']:.1%}. So the cap is exact "
            "to a block or two: a heap figure scaled by the factor is the room firmware gets, less "
            "what the unix port itself holds after start-up (here "
            f"{cap['live_at_start']:,} bytes before the script's own objects)."
        ),
        "",
        "## Machine",
        "",
        "```",
        versions["machine"],
        "```",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="tries per pattern (median kept)")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {REPORT.name}")
    args = ap.parse_args(argv)
    try:
        micropython = find_micropython()
        node = find_node()
    except SetupError as e:
        print(f"heap_factor: {e}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="heap_factor_") as tmp:
        workdir = Path(tmp)
        (workdir / "mod").mkdir()
        for i in range(MOD_COUNT):
            (workdir / "mod" / f"{MOD_PREFIX}{i}.py").write_text(MODULE_SOURCE.replace("@", str(i)))
        wire, why = wire_usable(micropython, workdir)
        stripped = 0
        if wire:
            (workdir / "wire").mkdir()
            text, stripped = strip_docstrings(WIRE.read_text())
            (workdir / "wire" / "wire.py").write_text(text)
        try:
            unix = run_unix(micropython, workdir, args.reps, wire)
            wasm = run_wasm(node, workdir, args.reps, wire)
        except SetupError as e:
            print(f"heap_factor: {e}", file=sys.stderr)
            return 2
        cap = heapsize_check(micropython, workdir)

    skips = [] if wire else [f"the kinhbac codec rows ({why})"]
    for name, reason in {**unix.skips, **wasm.skips}.items():
        if not reason.endswith(" given"):  # not asked for: said above
            skips.append(f"{name} ({reason})")
    s = summarise(unix, wasm)
    versions = {
        "unix_binary": micropython,
        "wasm_package": wasm_package_version(),
        "node": command_output([node, "--version"]),
        "python": platform.python_version(),
        "machine": machine_description(),
        "docstrings_stripped": stripped,
    }

    print("\n".join(table_lines(unix, wasm, s, markdown=False)))
    print()
    for line in skips:
        print("skipped:", line)
    print(f"unix port: {unix.info.get('version')}  |  wasm32: {wasm.info.get('version')}")
    print(
        f"GC block: unix {s['block_unix']} B, wasm32 {s['block_wasm']} B "
        f"(gcd of all deltas: {s['gcd_unix']}, {s['gcd_wasm']})"
    )
    print(
        f"factor (firmware mix, ratio of sums): {s['factor']:.2f}   unweighted: "
        f"{s['unweighted']:.2f}   min {s['min'][1]:.2f} ({s['min'][0]})   "
        f"max {s['max'][1]:.2f} ({s['max'][0]})"
    )
    print(
        f"-X heapsize check: min {cap['min_heapsize']:,} B for a workload leaving "
        f"{cap['live_after_workload']:,} B live; fails at {cap['fails_at']:,} B"
    )
    if not args.no_write:
        REPORT.write_text(report(unix, wasm, s, cap, versions, skips))
        print(f"wrote {REPORT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
