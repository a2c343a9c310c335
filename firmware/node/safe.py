# Safe mode's only traffic: tell the gateway that this node is in safe mode, and why, over a
# minimal link (WiFi, one connection, HELLO, its ACK, an ERROR), then wait for
# `safe_mode_retry_s` and try one normal boot. No readings, no watchdog (a technician may be
# at the REPL, reached with Ctrl-C), nothing loaded that the app's failure could lie in.
#
# On the wire: a HELLO like any other (its sensors' failure counts those of the state file),
# whose counter wire.DROP_SAFE_MODE has grown, and an ERROR (reason INTERNAL, ref 0: no frame
# refused) whose text is wire.SAFE_MODE_REPORT ("safe mode: ") and the reason, which the
# gateway logs and shows in the device's status. The ACK's clock also sets the RTC.
import asyncio
import time
import machine
from micropython import const

import wire
from node import log
from node.clock import set_rtc
from node.link import cut, read_frame, wire_reset_cause
from node.net import Gateway, Wifi

_RETRY_REPORT_MS = const(60000)  # an undelivered report is tried again this often
_TICK_MS = const(1000)
_DETAIL_MAX = const(200)  # bytes of the reason sent (str8: at most 255)


class Reporter:
    def __init__(self, cfg, state, version, reason):
        self.cfg = cfg
        self.state = state
        self.version = version
        self.reason = reason
        self.key = wire.Key(bytes.fromhex(cfg["device_id"]), cfg["key_id"],
                            bytes.fromhex(cfg["secret"]))
        self.guard = wire.DownlinkGuard(state.boot)
        self.wifi = Wifi(cfg["wifi"])
        self.gateway = Gateway(cfg["gateway"])
        self._frame = bytearray(wire.MAX_FRAME)

    async def report(self):
        """True once the gateway acknowledged the HELLO and took the ERROR."""
        if not await self.wifi.up():
            return False
        stream = await self.gateway.connect(None)
        try:
            await asyncio.wait_for_ms(self._exchange(stream), self.cfg["ack_timeout_ms"])
        finally:
            stream.close()
            await stream.wait_closed()
        log.info("safe mode reported to the gateway")
        return True

    async def _exchange(self, stream):
        state = self.state
        key = self.key
        sensors = [(e["name"], e.get("unit", "")) for e in self.cfg["sensors"]]
        failed = state.sensor_failures  # as the last normal boot left them: nothing reads now
        failures = [failed.get(name, (0, 0)) for name, _ in sensors]
        stream.write(wire.encode_hello(key, state.boot, self.guard.next_counter(), self.version,
                                       wire_reset_cause(machine), state.drops, sensors,
                                       failures))
        await stream.drain()
        lookup = wire.lookup_for(key)
        while True:
            msg = await read_frame(stream, self._frame, lookup, self.guard)
            if msg.type == wire.ACK:
                break
            if msg.type == wire.ERROR_DOWN:
                raise OSError("gateway refused the HELLO: %s" % wire.reason_name(msg.reason))
        if msg.gateway_time_ms is not None:
            set_rtc(msg.gateway_time_ms)
        stream.write(wire.encode_error(key, state.boot, self.guard.next_counter(), wire.INTERNAL,
                                       0, cut(wire.SAFE_MODE_REPORT + self.reason, _DETAIL_MAX), False))
        await stream.drain()


def enter(state, reason, cfg, version):
    """Safe mode: say why; with a config (None: it is the problem), report and retry later."""
    state.safe_reason = reason
    state.drops[wire.DROP_SAFE_MODE] += 1
    state.save()
    print("=" * 60)
    print("kinhbac: SAFE MODE:", reason)
    print("No readings are taken. Fix the cause, then: import node.app; "
          "node.app.leave_safe_mode()")
    retry_s = 0 if cfg is None else cfg["safe_mode_retry_s"]
    if cfg is not None:
        print("Ctrl-C for the REPL. Telling the gateway; a normal boot is tried again in %d s."
              % retry_s if retry_s else "Ctrl-C for the REPL. Telling the gateway.")
    print("=" * 60)
    if cfg is not None:
        asyncio.run(run(cfg, state, version, reason))


async def run(cfg, state, version, reason):
    """Report (when the config has an identity), then reset into a normal boot after
    safe_mode_retry_s (0: stay)."""
    reporter = None if "secret" not in cfg else Reporter(cfg, state, version, reason)
    retry_ms = cfg["safe_mode_retry_s"] * 1000
    start = time.ticks_ms()
    next_try = start
    while True:
        now = time.ticks_ms()
        if reporter is not None and time.ticks_diff(now, next_try) >= 0:
            try:
                if await reporter.report():
                    reporter = None
            except Exception as e:  # OSError, EOFError, TimeoutError, FrameError: try later
                log.info("safe mode not reported: %s: %s", type(e).__name__, e)
            next_try = time.ticks_add(time.ticks_ms(), _RETRY_REPORT_MS)
        if retry_ms and time.ticks_diff(time.ticks_ms(), start) >= retry_ms:
            print("kinhbac: safe mode: trying a normal boot again")
            state.safe_retry = True
            state.save()
            machine.reset()
        await asyncio.sleep_ms(_TICK_MS)
