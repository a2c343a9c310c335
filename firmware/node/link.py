# The uplink: WiFi, then a TCP session with the site's gateway speaking the wire codec.
#
# A session starts with HELLO; the gateway's first ACK carries its clock. Then batches of
# readings go out oldest first, up to WINDOW frames awaiting their ACK. A reading leaves the
# buffer only when an ACK covers it. Anything unexpected (a dead socket, an ACK that does not
# come, a frame that fails verification) ends the session; the next one resends whatever is
# not acknowledged, in new frames but with the same (boot, seq) identities.
#
# The send loop sleeps on an Event until there is something to do: the sampler wakes it when
# its readings make a batch due, the receiver on an ACK or when the connection dies, and a
# ticker when a deadline (a partial batch's send_after_ms, an ACK's timeout) has passed. The
# ticker's sleep_ms allocates nothing, so a waiting loop makes no garbage; the 50 ms
# wait_for_ms poll it replaces made two tasks and a TimeoutError every time: about 12 KB of
# garbage a second on an ESP32 (docs/firmware.md, "Link").
import asyncio
import random
import struct
import time
from micropython import const

import wire
from node import forget, log
from node.net import Gateway, Wifi
from node.store import F_PRE_SYNC, REC, REC_SIZE

WINDOW = const(4)  # READINGS frames in flight: enough to fill the link, little to resend
_TICK_MS = const(50)  # how late a deadline may be noticed; a tick allocates nothing
_NEVER = const(0x3FFFFFFF)  # a pending count the store never reaches: readings wake no one
_DETAIL_MAX = const(160)  # bytes of an ERROR's text: the field and what is wrong with it


def cut(text, limit):
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character."""
    data = text.encode()
    if len(data) <= limit:
        return text
    while limit and data[limit] & 0xC0 == 0x80:
        limit -= 1
    return data[:limit].decode()


def wire_reset_cause(machine):
    """machine.reset_cause() as the wire's code: the numbers differ between ports."""
    table = (
        ("PWRON_RESET", wire.RESET_POWER_ON),
        ("HARD_RESET", wire.RESET_HARD),
        ("WDT_RESET", wire.RESET_WATCHDOG),
        ("DEEPSLEEP_RESET", wire.RESET_DEEP_SLEEP),
        ("SOFT_RESET", wire.RESET_SOFT),
    )
    cause = machine.reset_cause()
    for name, code in table:
        if getattr(machine, name, None) == cause:
            return code
    return wire.RESET_UNKNOWN


def _readings_writer(key, batch_max):
    # A frame of batch_max readings: 196 bytes at the default 20 instead of MAX_FRAME's 1,400.
    size = wire.MIN_FRAME + wire.READINGS_HEAD_SIZE + batch_max * wire.READING_SIZE
    return wire.ReadingsWriter(key, bytearray(size))


async def _read_into(reader, view):
    # Straight into the frame buffer: readexactly() builds its answer by concatenation, a
    # 1 KB chunk frame cost several 1 KB blocks, and with an update's module loaded the
    # emulated ESP32 heap had no such block left (MemoryError).
    got = 0
    while got < len(view):
        n = await reader.readinto(view[got:])
        if n == 0:
            raise EOFError()
        got += n or 0  # None: nothing there yet


async def read_frame(reader, buf, lookup, guard):
    """The next whole frame from the gateway, verified (FrameError if refused)."""
    view = memoryview(buf)
    await _read_into(reader, view[:wire.HEADER_SIZE])
    length = wire.frame_length(buf)
    await _read_into(reader, view[wire.HEADER_SIZE:length])
    return wire.decode(view[:length], lookup, guard, True)


class SessionEnded(Exception):
    pass


class Link:
    def __init__(self, node):
        self.node = node
        cfg = node.cfg
        self.key = wire.Key(
            bytes.fromhex(cfg["device_id"]), cfg["key_id"], bytes.fromhex(cfg["secret"])
        )
        self.lookup = wire.lookup_for(self.key)
        self.guard = wire.DownlinkGuard(node.boot)
        self.wifi = Wifi(cfg["wifi"])
        self.gateway = Gateway(cfg["gateway"])
        self.connected = False
        self.last_ack_ms = 0  # boot ms of the last ACK: drives the no-network reboot
        self.acked = False  # the gateway answered this boot (an update's trial needs it)
        self._ota_sent = [-1, -1]  # counters of the last OTA frames: an ERROR may answer one
        self.ota_report = None  # (ref, wire OTA state, bytes, reason) to send in a session
        self.hello_due = True
        self.sessions = 0
        self._writer = _readings_writer(self.key, cfg["batch_max"])
        self._recs = bytearray(cfg["batch_max"] * REC_SIZE)  # one batch's records
        self._inflight = []  # [boot, last seq, count, sent ms] of each frame awaiting ACK
        self._sent_boot = 0
        self._sent_seq = 0
        self._wake = asyncio.Event()
        self._wake_pending = 1  # store.pending() at which new readings wake the send loop
        self._due = 0  # ticks_ms of the send loop's next deadline, while _has_due
        self._has_due = False
        self._progress = False  # the gateway acknowledged readings in this session
        self._dead = None
        self._one = bytearray(REC_SIZE)
        self._frame = bytearray(wire.MAX_FRAME)

    def set_counter(self, last_sent):
        """Continue a boot's uplink counter (deep sleep keeps it in RTC memory)."""
        self.guard.last_sent = last_sent

    def readings_added(self):
        """The sampler stored readings: wake the send loop if they make a batch due."""
        if self.node.store.pending() >= self._wake_pending:
            self._wake.set()

    def wake(self):
        """Settings changed: the send loop looks again at what is due."""
        self._wake.set()

    def request_hello(self):
        """Send a HELLO as soon as possible (drop counters or the sensor table changed)."""
        self.hello_due = True
        self._wake.set()

    # ----- WiFi and reconnecting -----

    async def _wifi(self):
        return await self.wifi.up()

    def _backoff_ms(self, failures):
        cfg = self.node.cfg
        cap = cfg["backoff_max_ms"]
        delay = cfg["backoff_min_ms"] << min(failures, 16)
        if delay > cap:
            delay = cap
        # Full jitter on the upper half, so that a site's nodes do not reconnect in step.
        return delay // 2 + random.getrandbits(16) * (delay // 2) // 65536

    async def run(self, once=False):
        """Keep a session going for ever (once=True: one session, for deep-sleep cycles).

        No exception ends it: whatever ends a session is logged and followed by a reconnect.
        If sessions keep failing, no ACK comes and the node's no-network reboot takes over.
        """
        failures = 0
        while True:
            ok = False
            self._progress = False
            try:
                if await self._wifi():
                    ok = await self._session(once)
            except (OSError, EOFError, SessionEnded, wire.FrameError) as e:
                # EOFError: MicroPython's readexactly when the gateway closes the connection.
                log.info("session ended: %s: %s", type(e).__name__, e)
            except Exception as e:  # anything else: asyncio.TimeoutError is no OSError here
                try:
                    log.error("link failed: %s: %s", type(e).__name__, e)
                except MemoryError:
                    pass  # the reconnect matters more than the line
            self.connected = False
            if once:
                return ok
            # A session that moved readings resets the backoff; one that did not doubles it.
            failures = 0 if ok or self._progress else failures + 1
            await asyncio.sleep_ms(self._backoff_ms(failures))

    # ----- one session -----

    async def _session(self, once):
        node = self.node
        stream = await self.gateway.connect(node.wdt)
        self.sessions += 1
        self._inflight = []
        self._sent_boot = node.store.acked_boot
        self._sent_seq = node.store.acked_seq
        try:
            timeout = node.cfg["ack_timeout_ms"]
            try:
                await asyncio.wait_for_ms(self._open(stream), timeout)
            except asyncio.TimeoutError:
                raise SessionEnded("no answer to HELLO within %d ms" % timeout)
            self.connected = True
            log.info("session %d with %s", self.sessions, self.gateway)
            receiver = asyncio.create_task(self._receive(stream, stream))
            try:
                return await self._send_loop(stream, receiver, once)
            finally:
                receiver.cancel()
        finally:
            stream.close()
            await stream.wait_closed()

    async def _open(self, stream):
        await self._send(stream, self._hello())
        await self._expect_ack(stream)

    async def _send(self, writer, frame):
        writer.write(frame)
        await writer.drain()

    def _hello(self):
        node = self.node
        self.hello_due = False
        drops = node.state.drops
        sensors = [(e["name"], e.get("unit", "")) for e in node.cfg["sensors"]]
        return wire.encode_hello(
            self.key,
            node.boot,
            self.guard.next_counter(),
            node.version,
            wire_reset_cause(node.machine),
            drops,
            sensors,
            node.sensors.failures(),
            node.store.free_flash(),
        )

    async def _read_frame(self, reader):
        return await read_frame(reader, self._frame, self.lookup, self.guard)

    async def _expect_ack(self, reader):
        """The gateway answers HELLO with an ACK carrying its clock (or an ERROR)."""
        while True:
            msg = await self._read_frame(reader)
            if msg.type == wire.ACK:
                self._on_ack(msg)
                return
            await self._on_other(msg, None)

    async def _receive(self, reader, writer):
        try:
            while True:
                msg = await self._read_frame(reader)
                if msg.type == wire.ACK:
                    self._on_ack(msg)
                else:
                    await self._on_other(msg, writer)
        except Exception as e:  # the send loop sees the dead session through _dead
            self._dead = e
            self._wake.set()

    def _on_ack(self, msg):
        node = self.node
        self.last_ack_ms = node.clock.now()
        self.acked = True
        if msg.gateway_time_ms is not None:
            node.on_clock(msg.gateway_time_ms)
        if msg.readings_boot is not None:
            node.store.ack(msg.readings_boot, msg.through_seq)
            self._progress = True
            b, s = msg.readings_boot, msg.through_seq
            while self._inflight and (
                    self._inflight[0][0] < b or (self._inflight[0][0] == b and self._inflight[0][1] <= s)):
                self._inflight.pop(0)
        self._wake.set()

    async def _on_other(self, msg, writer):
        if msg.type == wire.CONFIG:
            refused = self.node.on_config(msg.settings)
            if refused is not None and writer is not None:
                reason, detail = refused
                frame = wire.encode_error(
                    self.key, self.node.boot, self.guard.next_counter(), reason,
                    msg.counter, cut(detail, _DETAIL_MAX), False)
                await self._send(writer, frame)
        elif msg.type == wire.OTA_OFFER or msg.type == wire.OTA_CHUNK:
            if writer is not None:  # node/ota.py, loaded only while an update needs it
                from node import ota

                await ota.on_frame(self, msg, writer)
        elif msg.type == wire.ERROR_DOWN:
            if msg.reason == wire.UNSUPPORTED and msg.ref in self._ota_sent:
                # The gateway does not serve (or no longer serves) this update: it stops, and
                # the session, whose readings matter more, goes on.
                from node import ota

                ota.refused(self, msg.detail)
                return
            if msg.reason == wire.STALE_BOOT:
                self.node.on_stale_boot(msg.ref)
            raise SessionEnded("gateway refused a frame: %s %s" % (
                wire.reason_name(msg.reason), msg.detail))

    def _batch(self):
        """The next READINGS frame from the buffer, or None when nothing waits."""
        node = self.node
        room = node.cfg["batch_max"]
        if len(self._recs) < room * REC_SIZE:  # a CONFIG raised batch_max
            self._recs = bytearray(room * REC_SIZE)
            self._writer = _readings_writer(self.key, room)
        n = node.store.read_after(self._sent_boot, self._sent_seq, self._recs, room)
        if n == 0:
            return None
        boot0, seq0, t0, _, _, f0 = struct.unpack_from(REC, self._recs, 0)
        offset = node.offset_for(boot0)
        unsynced = offset is None
        pre = bool(f0 & F_PRE_SYNC) and not unsynced
        w = self._writer
        w.begin(boot0, seq0, t0 if unsynced else t0 + offset, unsynced, pre)
        count = 0
        for i in range(n):
            _, _, t, value, sensor, flags = struct.unpack_from(REC, self._recs, i * REC_SIZE)
            if not unsynced and bool(flags & F_PRE_SYNC) != pre:
                break  # a batch is either pre-sync or not
            if not w.add(sensor, t - t0, value):
                break
            count += 1
        last = seq0 + count - 1
        self._sent_boot, self._sent_seq = boot0, last
        self._inflight.append([boot0, last, count, node.clock.now()])
        return w.finish(node.boot, self.guard.next_counter())

    def _oldest_unsent_ms(self):
        if self.node.store.read_after(self._sent_boot, self._sent_seq, self._one, 1) == 0:
            return self.node.clock.now()
        return struct.unpack_from(REC, self._one, 0)[2]

    def _wait_for(self, deadline_ms, pending):
        """Before sleeping: wake at deadline_ms from now (None: none), or when the store holds
        `pending` readings."""
        self._wake_pending = pending
        if deadline_ms is None:
            self._has_due = False
        else:
            self._due = time.ticks_add(time.ticks_ms(), deadline_ms)
            self._has_due = True

    async def _tick(self):
        # Checks the send loop's deadline; sleep_ms and the comparison allocate nothing.
        while True:
            await asyncio.sleep_ms(_TICK_MS)
            if self._has_due and time.ticks_diff(time.ticks_ms(), self._due) >= 0:
                self._has_due = False
                self._wake.set()

    async def _send_loop(self, writer, receiver, once):
        node = self.node
        self._dead = None
        ticker = asyncio.create_task(self._tick())
        try:
            while True:
                self._wake.clear()  # anything from here on wakes the wait below
                cfg = node.cfg  # a CONFIG frame replaces it
                if self._dead is not None:
                    raise SessionEnded("receive: %r" % (self._dead,))
                if self.hello_due:
                    await self._send(writer, self._hello())
                if self.ota_report is not None:  # an update's outcome (confirmed, rolled back)
                    from node import trial

                    try:
                        await trial.send_report(self, writer)
                    finally:
                        forget("trial")
                now = node.clock.now()
                deadline = None
                if self._inflight:
                    deadline = self._inflight[0][3] + cfg["ack_timeout_ms"] - now
                    if deadline < 0:
                        raise SessionEnded("no ACK within %d ms" % cfg["ack_timeout_ms"])
                in_flight = 0
                for entry in self._inflight:
                    in_flight += entry[2]
                pending = node.store.pending()
                unsent = pending - in_flight
                wake_at = pending + 1  # nothing to send: the next reading starts a batch
                if len(self._inflight) >= WINDOW:
                    wake_at = _NEVER  # only an ACK makes room
                elif unsent > 0:
                    wait = 0 if once or unsent >= cfg["batch_max"] else (
                        self._oldest_unsent_ms() + cfg["send_after_ms"] - now)
                    if wait <= 0:
                        frame = self._batch()
                        if frame is not None:
                            await self._send(writer, frame)
                            continue
                    elif deadline is None or wait < deadline:
                        deadline = wait
                    wake_at = in_flight + cfg["batch_max"]  # or when a whole batch waits
                if once and pending == 0:
                    return True
                self._wait_for(deadline, wake_at)
                await self._wake.wait()
        finally:
            ticker.cancel()
