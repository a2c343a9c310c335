# The emulated board's hardware bus: a link to the emulator, which holds the device models,
# the watchdog, RTC memory and the access point. Runs under MicroPython only; never copied to a
# real board.
#
# Calls (request, then one response) come from the main thread. Events (pin edges, WiFi link
# changes) arrive on a second socket, read by a thread that plays the part of the interrupt
# controller. Buffers are allocated once so that the firmware's heap figures stay honest.
import os
import struct
import usocket
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

link_up = False
pin_levels = {}
_irq_handlers = {}  # pin id -> (pin object, handler, hard)
lost_irqs = 0


def env(name, default=None):
    value = os.getenv("KINHBAC_" + name)
    return default if value is None else value


def _connect(path):
    s = usocket.socket(usocket.AF_UNIX, usocket.SOCK_STREAM)
    # The unix port takes a raw struct sockaddr_un for AF_UNIX: family, then the path.
    s.connect(struct.pack("<H", usocket.AF_UNIX) + path.encode() + b"\x00")
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


def set_irq(pin_id, pin, handler, hard):
    if handler is None:
        _irq_handlers.pop(pin_id, None)
    else:
        _irq_handlers[pin_id] = (pin, handler, hard)


def _dispatch_edge(pin_id, level):
    global lost_irqs
    pin_levels[pin_id] = level
    entry = _irq_handlers.get(pin_id)
    if entry is None:
        return
    pin, handler, hard = entry
    trigger = pin._trigger
    if not (trigger & (2 if level == 0 else 1)):  # IRQ_FALLING = 2, IRQ_RISING = 1
        return
    if hard:
        handler(pin)
    else:
        try:
            micropython.schedule(handler, pin)
        except RuntimeError:
            lost_irqs += 1  # the schedule queue was full: a real board loses the edge too


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


def start():
    """Connect to the emulator; called once by the board's ROM before anything else runs."""
    global _call_sock
    _call_sock = _connect(env("CALLS"))
    events = _connect(env("EVENTS"))
    _thread.start_new_thread(_event_loop, (events,))


def env_int(name, default=0):
    return int(env(name, str(default)))
