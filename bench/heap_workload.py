# Heap cost of allocation patterns typical of Kinhbac node firmware, in MicroPython's common
# subset. Run unchanged by the 64-bit unix port and by the 32-bit (wasm32) webassembly port;
# bench/heap_factor.py compares the two, prepending a prelude that sets REPS, MODDIR (folder
# holding MOD_COUNT ~50-line modules named MOD_PREFIX + i) and WIRE_DIR (folder holding
# kinhbac's wire.py); alone it runs the in-memory patterns only.
#
# A pattern's cost is the gc.mem_alloc() delta across building it, after a full collection
# before and after, so only what stays reachable counts; the median of REPS tries is kept.
# The measuring is done by step(), called repeatedly until it returns False:
# - on the unix port gc.collect() collects at once (scanning the C stack conservatively: a
#   stale word can keep some garbage for one try, hence the median), and this file's last
#   lines call step() in a loop;
# - on the webassembly "pyscript" variant gc.collect() only marks a collection as pending;
#   it runs when control returns to JavaScript, with no stack to scan. So the Node runner
#   calls `step()` as separate top-level code until it returns False: each call reads the
#   heap right after the collection that ended the previous call. Every call compiles the
#   same one-line snippet, so that code's own heap is the same at both readings.
# Output lines, parsed by heap_factor.py:
#   INFO|key|value    ROW|name|bytes|note    SKIP|name|reason    DONE
# ruff: noqa: UP031  (%-formatting: the common subset of MicroPython and CPython)
import gc
import json
import struct
import sys

_given = globals()  # the prelude's settings, with defaults for a run without one
REPS = _given.get("REPS", 5)
MODDIR = _given.get("MODDIR")
MOD_PREFIX = _given.get("MOD_PREFIX", "hf_mod50_")
MOD_COUNT = _given.get("MOD_COUNT", 0)
WIRE_DIR = _given.get("WIRE_DIR")

RECORD = 16  # bytes per ring record: u32 seq, u32 time s, f32 value, u8 sensor, 3 spare
RING = 1000
CONFIG_DOC = (
    '{"node":"kb-0042","site":"hanoi-07","fw":"1.4.2","wifi":{"ssid":"kinhbac-iot",'
    '"channel":6,"retries":5},"mqtt":{"host":"gw.local","port":1883,"keepalive":60},'
    '"sample_ms":5000,"batch":48,"sensors":[{"id":0,"kind":"temp","scale":0.01},'
    '{"id":1,"kind":"rh","scale":0.1},{"id":2,"kind":"pm25","scale":1}],"ota":false,'
    '"tz":7,"led":true}'
)


def median(values):
    s = sorted(values)
    return s[len(s) // 2]


# ---- Builders: each returns the object(s) whose heap cost is measured -----------------------


def one_float():
    return float(len(CONFIG_DOC)) * 0.5  # made at run time: a constant would be pre-built


def floats_100():
    return [i * 0.5 + 0.25 for i in range(100)]


def dict_literal_10():
    # Keys written in the source are interned qstrs: only the dict and its table are heap.
    return {"a0": 0, "a1": 1, "a2": 2, "a3": 3, "a4": 4, "a5": 5, "a6": 6, "a7": 7, "a8": 8,
            "a9": 9}  # fmt: skip


def dict_runtime_keys(n):
    def build():
        d = {}
        for i in range(n):
            d["sensor-%03d" % i] = i
        return d

    return build


def bytearray_of(n):
    return lambda: bytearray(n)


class Reading:
    def __init__(self, sensor, seq, t, value):
        self.sensor = sensor
        self.seq = seq
        self.t = t
        self.value = value


def instances_100():
    out = [None] * 100
    for i in range(100):
        out[i] = Reading(i & 7, i, i * 5, None)
    return out


def tuples_100():
    out = [None] * 100
    for i in range(100):
        out[i] = (i, i + 1, i + 2)
    return out


def strs_100():
    out = [None] * 100
    for i in range(100):
        out[i] = "node-%03d" % i
    return out


def bytes_100():
    out = [None] * 100
    for i in range(100):
        out[i] = ("node-%03d" % i).encode()
    return out


def ring_records():
    ring = [None] * RING
    for i in range(RING):
        ring[i] = bytearray(RECORD)
    return ring


def ring_flat():
    return bytearray(RECORD * RING)


def config_json():
    return json.loads(CONFIG_DOC)


def struct_packs_100():
    out = [None] * 100
    for i in range(100):
        out[i] = struct.pack("<IIfB", i, i * 5, 0.5, i & 7)
    return out


def exception_obj():
    try:
        raise ValueError("sensor %d timed out" % len(CONFIG_DOC))
    except ValueError as e:
        return e


def make_closure(n):
    def scaled(x):
        return x * n

    return scaled


def closures_10():
    out = [None] * 10
    for i in range(10):
        out[i] = make_closure(i)
    return out


def epoch_ints_100():
    # Unix time in seconds (~1.77e9) is past the 30-bit small int of a 32-bit port.
    base = 1767225600 + len(CONFIG_DOC)
    out = [None] * 100
    for i in range(100):
        out[i] = base + i
    return out


def import_module(name):
    def build():
        return __import__(name)

    return build


def import_small_modules():
    return [__import__(MOD_PREFIX + str(i)) for i in range(MOD_COUNT)]


def wire_module():
    if "wire" not in sys.modules:
        raise ImportError("wire did not import")
    return sys.modules["wire"]


WIRE_DEV = b"\x6b\x62\x00\x01\x02\x03\x04\x05"


def wire_node_state():
    # What a node keeps for its codec: its key and a READINGS writer with its 1400-byte buffer.
    wire = wire_module()
    key = wire.Key(WIRE_DEV, 1, bytes(range(32)))
    return key, wire.ReadingsWriter(key)


def wire_decoded_ack():
    # A node decoding its gateway's ACK: the message and the node's downlink guard stay.
    wire = wire_module()
    key = wire.Key(WIRE_DEV, 1, bytes(range(32)))
    guard = wire.DownlinkGuard(3)
    uplink = guard.next_counter()
    frame = wire.encode_ack(key, 3, wire.downlink_counter(uplink, 0), 3, 40, 1767225600000)
    return wire.decode(frame, wire.lookup_for(key), guard, True), guard


# ---- What the interpreter is -----------------------------------------------------------------


def small_int_max_bits():
    # Largest n with 2**n - 1 a small int (no heap): 30 on a 32-bit port, 62 on a 64-bit one.
    import micropython

    n = 8
    while n < 70:
        v = (1 << n) - 1
        micropython.heap_lock()
        try:
            v + 0  # a big int makes a new big int: an allocation, refused while locked
            small = True
        except MemoryError:
            small = False
        micropython.heap_unlock()
        if not small:
            return n - 1
        n += 1
    return n


def float_kind():
    # 1 + 2**-k == 1 first at k = 24 for float32 and at k = 53 for float64.
    k = 1
    while 1.0 + 2.0**-k != 1.0:
        k += 1
    return "float32" if k < 30 else "float64"


def collect_is_immediate():
    # Garbage made and dropped: does gc.collect() give its bytes back before it returns?
    for _ in range(2):
        gc.collect()
        before = gc.mem_alloc()
        [bytearray(64) for _ in range(16)]
        gc.collect()
    return gc.mem_alloc() <= before


def info():
    print("INFO|implementation|%s" % (sys.implementation,))
    print("INFO|version|%s" % sys.version)
    print("INFO|platform|%s" % sys.platform)
    print("INFO|maxsize|%d" % sys.maxsize)
    print("INFO|small_int_max|2**%d-1" % small_int_max_bits())
    print("INFO|float|%s" % float_kind())
    print("INFO|gc_collect|%s" % ("immediate" if IMMEDIATE else "deferred to top level"))


# ---- The patterns and the stepper ------------------------------------------------------------

PATTERNS = [
    ("one float", one_float, "smallest object: one GC block"),
    ("bytearray(1)", bytearray_of(1), "object + 1-byte data block"),
    ("list of 100 floats", floats_100, "list comprehension, grown by append"),
    ("dict str->int, 10 (literal keys)", dict_literal_10, "keys are interned qstrs"),
    ("dict str->int, 10 (runtime keys)", dict_runtime_keys(10), "keys made with %"),
    ("dict str->int, 100 (runtime keys)", dict_runtime_keys(100), "keys made with %"),
    ("bytearray(1024)", bytearray_of(1024), ""),
    ("bytearray(64)", bytearray_of(64), ""),
    ("class instance, 4 attrs x100", instances_100, "in a preallocated list"),
    ("tuple of 3 ints x100", tuples_100, "in a preallocated list"),
    ("short str x100", strs_100, "8 chars, in a preallocated list"),
    ("short bytes x100", bytes_100, "8 bytes, in a preallocated list"),
    ("ring: 1000 x bytearray(16)", ring_records, "preallocated records"),
    ("ring: one bytearray(16000)", ring_flat, "same ring, flat"),
    ("json.loads config (%d B)" % len(CONFIG_DOC), config_json, ""),
    ("struct.pack result x100", struct_packs_100, "13-byte bytes each"),
    ("exception object", exception_obj, "ValueError with traceback"),
    ("closure x10", closures_10, "function + cell each"),
    ("epoch-second int x100", epoch_ints_100, "big int on 32-bit only"),
]
ONCE = {}  # name -> True: measured on the first try only (an import is cached after it)
if MODDIR is not None:
    sys.path.insert(0, MODDIR)
    name = "import %d x 50-line module" % MOD_COUNT
    PATTERNS.append((name, import_small_modules, "first import, .py source"))
    ONCE[name] = True
else:
    print("SKIP|import of small modules|no MODDIR given")
if WIRE_DIR is not None:
    sys.path.insert(0, WIRE_DIR)
    PATTERNS.append(("import wire", import_module("wire"), "first import, .py source"))
    ONCE["import wire"] = True
    PATTERNS.append(("wire: Key + ReadingsWriter", wire_node_state, "node codec state"))
    PATTERNS.append(("wire: decoded ACK + guard", wire_decoded_ack, "node side"))
else:
    print("SKIP|import wire|no WIRE_DIR given")

IMMEDIATE = collect_is_immediate()
info()
_state = [0, 0, 0, 0]  # pattern index, try, phase (0: build, 1: read), heap before
_deltas = [0] * REPS
_obj = None


def step():
    global _obj
    if IMMEDIATE:
        gc.collect()
        gc.collect()
    now = gc.mem_alloc()
    index, rep, phase, before = _state
    if index >= len(PATTERNS):
        print("DONE")
        return False
    name, build, note = PATTERNS[index]
    reps = 1 if name in ONCE else REPS
    if phase == 0:
        _state[3] = now
        try:
            _obj = build()
        except Exception as e:  # noqa: BLE001  (a pattern this port cannot run is skipped)
            _obj = None
            print("SKIP|%s|%s: %s" % (name, type(e).__name__, e))
            _state[0] = index + 1
            _state[1] = 0
            gc.collect()
            return True
        _state[2] = 1
    else:
        _obj = None
        _deltas[rep] = now - before
        rep += 1
        if rep == reps:
            print("ROW|%s|%d|%s" % (name, median(_deltas[:reps]), note))
            index += 1
            rep = 0
        _state[0] = index
        _state[1] = rep
        _state[2] = 0
    gc.collect()  # on the webassembly port: runs when this top-level call returns
    return True


if IMMEDIATE:
    while step():
        pass
