# The emulated board's hardware bus: a link to the emulator, which holds the device models,
# the watchdog, RTC memory and the access point. Runs under MicroPython only; never copied to a
# real board.
#
# Calls (request, then one response) come from the main thread. Events (pin edges, WiFi link
# changes) arrive on a second socket, read by a thread that plays the part of the interrupt
# controller. Buffers are allocated once so that the firmware's heap figures stay honest.
#
# Pin handlers go through a queue of 8, the ESP32 port's scheduler depth
# (MICROPY_SCHEDULER_DEPTH in ports/esp32/mpconfigport.h; the unix port's is 4): an edge that
# finds it full is lost and counted in `lost_irqs`. The queue is run by one
# micropython.schedule() callback, and a byte on an in-process socket wakes the main thread
# out of select.poll() (standins/select.py), because the unix port runs scheduled callbacks
# only between bytecodes while the ESP32's poll runs them as it waits (MICROPY_EVENT_POLL_HOOK).
import os
import sys
import struct
import usocket
import utime
import _thread
import micropython

# Request ops; the emulator's board.py holds the same table.
OP_I2C_WRITE = 1
OP_I2C_READ = 2
OP_I2C_SCAN = 3
OP_ADC_READ = 4
OP_ADC_ATTEN = 5
OP_PIN_IRQ = 6
OP_PIN_WRITE = 7
OP_WDT_START = 8
OP_WDT_FEED = 9
OP_RESET = 10
OP_DEEPSLEEP = 11
OP_RTC_MEM_READ = 12
OP_RTC_MEM_WRITE = 13
OP_WLAN_CONNECT = 14
OP_WLAN_DISCONNECT = 15
OP_ROUTE = 16
OP_LOG = 17
OP_WLAN_STATUS = 18
OP_RESOLVE = 19
OP_CONNECT = 20
OP_OTA = 21  # esp32.Partition's OTA calls: boot, running, next, set_boot, mark valid
# 40 and up: setting up the emulated hardware.
OP_I2C_INIT = 40  # a bus's timeout, applied when a device holds the bus
OP_RTC_SET = 41  # machine.RTC().datetime(t): the RTC the emulator keeps across resets
OP_WLAN_ACTIVE = 42  # WLAN.active(on): esp_wifi_start()/stop(), which take and free ADC2
OP_ROM_READY = 43  # the ROM imported every stand-in: from now on Ctrl-C interrupts the board

# Ops that expect no response, so that they are safe from an IRQ handler.
ONE_WAY = (OP_PIN_WRITE, OP_WDT_FEED)

EV_EDGE = 1
EV_LINK = 2

_HDR = "<BHH"
_RESP = "<bH"
_MAX_PAYLOAD = 2048 + 64

_call_sock = None
_req = bytearray(5 + _MAX_PAYLOAD)
_resp = bytearray(3 + _MAX_PAYLOAD)
_resp_mv = memoryview(_resp)
_busy = False

_IRQ_QUEUE = 8  # MICROPY_SCHEDULER_DEPTH of the ESP32 port
_UNDRIVEN = 0xFF

link_up = False
started = False
# Per GPIO: the level something drives it to (the emulator's device models, or the pin's own
# output), or _UNDRIVEN. Fixed-size: this thread and the main thread use it without a lock.
pin_levels = bytearray(b"\xff" * 40)
_irq_pins = [None] * 40  # the Pin objects whose irq() is set, per GPIO
_irq_handlers = [None] * 40
lost_irqs = 0
# The queue of pending handler calls: the event thread writes slots and _head, the main thread
# reads them and moves _tail, so neither needs a lock.
_queue_fn = [None] * _IRQ_QUEUE
_queue_pin = [None] * _IRQ_QUEUE
_head = 0
_tail = 0
_run_pending = False
# While the flash chip erases, the cache is off and the GPIO interrupt waits: each pin's
# status bit holds one edge, further edges of that pin are lost (see stall_us).
cache_off = False
_latched = 0
erase_us = 0  # CPU stall per 4 KiB sector erase, 0 when no board runs (the factory tool)
wake_r = None  # the main thread polls this (standins/select.py)
_wake_w = None
_wake_buf = None
_ONE = b"\x01"


def env(name, default=None):
    value = os.getenv("KINHBAC_" + name)
    return default if value is None else value


def _connect(path):
    s = usocket.socket(usocket.AF_UNIX, usocket.SOCK_STREAM)
    s.connect(_sockaddr(path))
    return s


def _read_exact(sock, mv, n):
    got = 0
    while got < n:
        # A whole read into the buffer itself allocates nothing; a slice only after a short read.
        k = sock.readinto(mv if got == 0 and len(mv) == n else mv[got:n])
        if not k:
            raise OSError(5)  # EIO: the emulator went away, as if the board lost power
        got += k


def call(op, a=0, payload=b""):
    """One request to the emulator; returns a memoryview of the reply, valid until the next call."""
    global _busy
    n = len(payload)
    if n > _MAX_PAYLOAD:
        raise ValueError("emulator call payload too large")
    if op in ONE_WAY:
        buf = bytearray(5 + n)  # IRQ-safe path: never touches the shared request buffer
        struct.pack_into(_HDR, buf, 0, op, a, n)
        buf[5:] = payload
        _call_sock.write(buf)
        return None
    if _busy:
        raise RuntimeError("emulated hardware called from an IRQ handler during another call")
    _busy = True
    try:
        struct.pack_into(_HDR, _req, 0, op, a, n)
        _req[5 : 5 + n] = payload
        _call_sock.write(memoryview(_req)[: 5 + n])
        _read_exact(_call_sock, _resp_mv, 3)
        status, length = struct.unpack_from(_RESP, _resp, 0)
        _read_exact(_call_sock, _resp_mv[3:], length)
    finally:
        _busy = False
    if status < 0:
        raise OSError(-status)
    return _resp_mv[3 : 3 + length]


def set_irq(pin_id, pin, handler):
    _irq_handlers[pin_id] = handler
    _irq_pins[pin_id] = pin if handler is not None else None


def _dispatch_edge(pin_id, level):
    # The event thread: the port's machine_pin_isr_handler, mp_sched_schedule(handler, pin).
    global lost_irqs, _head, _run_pending, _latched
    pin_levels[pin_id] = level
    handler = _irq_handlers[pin_id]
    pin = _irq_pins[pin_id]
    if handler is None or pin is None:
        return
    if not (pin._trigger & (2 if level == 0 else 1)):  # IRQ_FALLING = 2, IRQ_RISING = 1
        return
    if cache_off:
        bit = 1 << pin_id
        if _latched & bit:
            lost_irqs += 1  # the pin's interrupt is already pending: the edge merges into it
            return
        _latched |= bit
    if _head - _tail >= _IRQ_QUEUE:
        lost_irqs += 1  # the scheduler queue is full: mp_sched_schedule() returns false
        return
    i = _head % _IRQ_QUEUE
    _queue_fn[i] = handler
    _queue_pin[i] = pin
    _head += 1
    if not _run_pending:
        _run_pending = True  # before scheduling: the main thread may run the queue at once
        try:
            micropython.schedule(_run_queue, None)
        except RuntimeError:
            _run_pending = False  # the unix port's own queue is full: the next edge retries
        if _wake_w is not None:
            _wake_w.write(_ONE)  # non-blocking: a full socket already holds a wake-up


def _run_queue(_):
    # The main thread, between bytecodes: each queued handler once, oldest first. As the port's
    # mp_sched_run_pending (mp_call_function_1_protected), an exception is printed and the
    # next handler still runs.
    global _tail, _run_pending
    _run_pending = False
    while _tail != _head:
        i = _tail % _IRQ_QUEUE
        handler = _queue_fn[i]
        pin = _queue_pin[i]
        _tail += 1
        try:
            handler(pin)
        except BaseException as e:  # noqa: B036 (the port catches everything here)
            sys.print_exception(e)


def stall_us(us):
    """The CPU stops for `us` with the flash cache off (a sector erase): no Python runs, and
    each pin's interrupt holds at most one edge until it ends (ESP-IDF "Concurrency Constraints
    for Flash on SPI1": non-IRAM interrupts are disabled; the port's GPIO ISR is not IRAM)."""
    global cache_off, _latched
    _latched = 0
    cache_off = True
    try:
        utime.sleep_us(us)  # the unix port's usleep(): no scheduled callback runs meanwhile
    finally:
        cache_off = False


def drain_wake():
    """Empty the wake socket (the main thread, from select.poll)."""
    while wake_r.readinto(_wake_buf):
        pass


def _event_loop(sock):
    global link_up
    ev = bytearray(5)
    mv = memoryview(ev)
    while True:
        try:
            _read_exact(sock, mv, 5)
        except OSError:
            return
        # Plain indexing, not struct: this thread plays the interrupt controller and must not
        # allocate, or it would show up in the firmware's heap figures.
        kind = ev[0]
        a = ev[1] | (ev[2] << 8)
        b = ev[3] | (ev[4] << 8)
        if kind == EV_EDGE:
            _dispatch_edge(a, b)
        elif kind == EV_LINK:
            link_up = bool(a)


def _sockaddr(path):
    # The unix port takes a raw struct sockaddr_un for AF_UNIX: family, then the path.
    return struct.pack("<H", usocket.AF_UNIX) + path.encode() + b"\x00"


def _wake_pair(path):
    # A connected pair of sockets inside this process (the unix port has no socketpair()).
    try:
        os.remove(path)
    except OSError:
        pass
    listener = usocket.socket(usocket.AF_UNIX, usocket.SOCK_STREAM)
    listener.bind(_sockaddr(path))
    listener.listen(1)
    w = usocket.socket(usocket.AF_UNIX, usocket.SOCK_STREAM)
    w.connect(_sockaddr(path))
    r = listener.accept()[0]
    listener.close()
    os.remove(path)
    r.setblocking(False)
    w.setblocking(False)
    return r, w


def start():
    """Connect to the emulator; called once by the board's ROM before anything else runs."""
    global _call_sock, started, erase_us, wake_r, _wake_w, _wake_buf
    global _connect, _sockaddr, _wake_pair, start
    _call_sock = _connect(env("CALLS"))
    events = _connect(env("EVENTS"))
    wake_r, _wake_w = _wake_pair(env("CALLS") + "w")
    _wake_buf = bytearray(64)
    erase_us = env_int("ERASE_US", 45000)
    started = True
    _thread.start_new_thread(_event_loop, (events,))
    # The ESP32's own select (its poll runs pin handlers while it waits) and asyncio imported
    # on first use with the unix port's time: see standins/_asyncio_lazy.py.
    import select  # noqa: F401
    import _asyncio_lazy

    sys.modules["asyncio"] = sys.modules["uasyncio"] = _asyncio_lazy
    # Code that only starts the board is C in a chip's flash: here its bytecode would hold heap.
    del _connect, _sockaddr, _wake_pair, start


def env_int(name, default=0):
    return int(env(name, str(default)))
