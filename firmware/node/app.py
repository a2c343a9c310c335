# The node: read sensors on schedule, keep every reading until the gateway acknowledges it,
# keep the link up, and recover by itself.
#
# Start-up order matters for a board in the field:
#  1. count the boot (flash), and go to safe mode after too many boots that never became good;
#  2. a short console window in which Ctrl-C leaves a technician at the REPL, watchdog off;
#  3. arm the watchdog, then run the sampler, the link and the housekeeping tasks.
# Any unexpected error reboots the board; the boot counts as bad until it has lived
# `good_after_ms`, so a crash loop ends in safe mode instead of looping for ever. Safe mode
# tells the gateway, and after `safe_mode_retry_s` tries one normal boot again.
import gc
import json
import os
import sys
import time
import asyncio
import esp32
import machine
from micropython import const

import wire
from node import forget, log
from node.clock import Clock, set_rtc
from node.link import Link, wire_reset_cause
from node.rtc import RtcMemory, name_key
from node.sensors import build_sensors
from node.state import State
from node.store import F_PRE_SYNC, Store
from node.watchdog import Watchdog

VERSION = "0.1.0"
_HOUSEKEEPING_MS = const(250)  # watchdog feed, flush check, pulse counts into RTC memory
_HEAP_REPORT_MS = const(1000)  # at debug level: how tests and bench watch the heap
_NO_ROLLBACK = const(-261)  # ESP_ERR_NOT_FOUND: the bootloader has no app rollback
APP_PATH = "/app.json"  # which app runs (main.py reads it): docs/ota.md
_IMAGE = const(2)  # wire.OTA_IMAGE: a release that is a whole firmware image


class Node:
    def __init__(self, cfg, state, boot, clock, rtc):
        self.cfg = cfg
        self.state = state
        self.boot = boot
        self.clock = clock
        self.rtc = rtc
        self.machine = machine
        # From an update (docs/ota.md): the release's version, its trial, a result to report.
        app = read_json(APP_PATH)
        if app.get("trial") and app.get("kind") == _IMAGE:
            from node import trial

            if trial.image_rolled_back(app):
                app = read_json(APP_PATH)
            forget("trial")
        self.version = app.get("version") or VERSION
        self.app = app if app.get("trial") else None  # on trial until confirmed
        self.ota = None  # node/ota.py's Ota while an offer is worked on
        self._clean = False  # the last sample round read every sensor (kept on trial only)
        back = app.get("rolled_back")
        self.seq = 0
        self.store = Store(
            cfg["ram_readings"], cfg["flash_readings"], cfg["flash_every"], cfg["flash_after_ms"]
        )
        self.sensors = build_sensors(self._i2c, cfg["sensors"], self._saved_pulses(),
                                     state.sensor_failures)
        self._pulses_moved = False  # counted since the pulse totals last went to flash
        self.link = Link(self)
        if back and not back.get("told"):  # main.py rolled an update back: say so, once
            self.link.ota_report = (back["ref"], wire.OTA_ROLLED_BACK, 0, back.get("reason", ""))
        self.wdt = None  # a Watchdog once armed
        self.resumed = False  # a wake from deep sleep: the boot began earlier
        self.taken = 0
        self._sampler = None

    def _saved_pulses(self):
        # RTC memory holds the newest counts unless the power was cut; flash holds those of
        # the last state write. The larger is the newer: a count only grows.
        in_rtc = self.rtc.pulses()
        counts = {}
        for entry in self.cfg["sensors"]:
            if entry["kind"] == "pulse":
                name = entry["name"]
                on_flash = self.state.pulses.get(name, 0)
                if not isinstance(on_flash, int):
                    on_flash = 0
                counts[name] = max(on_flash, in_rtc.get(name_key(name), 0))
        return counts

    def _use_sensors(self, table):
        """Stop the running sensors, start `table`'s; pulse totals and failure counts carry
        over by name."""
        counts = self.sensors.pulse_counts()
        failed = self.sensors.failure_counts()
        self.sensors.deinit()
        self.sensors = build_sensors(self._i2c, table, counts, failed)

    def save_state(self):
        """Write the state file with the pulse totals and failure counts as they are now."""
        self.state.pulses = self.sensors.pulse_counts()
        self.state.sensor_failures = self.sensors.failure_counts()
        self.state.save()
        self._pulses_moved = False

    def _i2c(self):
        bus = self.cfg["i2c"]
        return machine.I2C(bus["id"], scl=machine.Pin(bus["scl"]), sda=machine.Pin(bus["sda"]),
                           freq=bus.get("freq", 400000))

    # ----- readings -----

    def _store_reading(self, index, value):
        self.seq += 1
        flags = 0 if self.clock.synced else F_PRE_SYNC
        self.store.add(self.boot, self.seq, self._now, value, index, flags)
        self.taken += 1

    def sample_once(self):
        self._now = self.clock.now()
        sensors = self.sensors
        failed = sensors.errors_total()
        out_of_range = sensors.out_of_range_total()
        first = self.seq + 1
        writes = self.store.flash_writes
        sensors.sample(self._store_reading)
        if self.app is not None:  # on trial: it confirms once it reached its gateway
            self._clean = sensors.errors_total() == failed  # ... and read every sensor
            if self._clean and self.link.acked:
                self._confirm()
        if log.LEVEL >= 3:
            log.debug("took seq %d..%d", first, self.seq)
            if self.store.flash_writes != writes:
                log.debug("saved through seq %d", self.store.saved_seq)
        drops = self.state.drops
        drops[wire.DROP_SENSOR_ERROR] += sensors.errors_total() - failed
        drops[wire.DROP_OUT_OF_RANGE] += sensors.out_of_range_total() - out_of_range
        if sensors.news:  # a sensor failed in a new way (or read again): counts to the gateway
            sensors.news = False
            self.link.request_hello()
        self._collect_drops()
        self.link.readings_added()

    def _collect_drops(self):
        store = self.store
        if store.dropped_full or store.dropped_storage:
            self.state.drops[wire.DROP_BUFFER_FULL] += store.dropped_full
            self.state.drops[wire.DROP_STORAGE_ERROR] += store.dropped_storage
            store.dropped_full = store.dropped_storage = 0
            self.link.request_hello()  # the gateway hears of drops in the next HELLO

    async def sampler(self):
        interval = self.cfg["interval_ms"]
        next_at = time.ticks_ms()
        while True:
            try:
                self.sample_once()
            except MemoryError:
                # This round's readings are lost, not the sampler: a task that raised would
                # stop every later round while the board went on as if sampling. Counted as
                # one storage error: the readings of the round are not all kept.
                gc.collect()
                self.state.drops[wire.DROP_STORAGE_ERROR] += 1
            interval = self.cfg["interval_ms"]
            next_at = time.ticks_add(next_at, interval)
            wait = time.ticks_diff(next_at, time.ticks_ms())
            if wait < 0:  # fell behind (a slow sensor): skip ahead rather than burst
                next_at = time.ticks_ms()
                wait = 0
            await asyncio.sleep_ms(wait)

    # ----- what the link reports -----

    def on_clock(self, unix_ms):
        clock = self.clock
        before = clock.offset
        if clock.sync(unix_ms):
            log.info("clock synced")
        if clock.offset != before:
            set_rtc(clock.offset + clock.now())  # for the boots after a reset that cannot sync
        self.keep_offset(clock.offset)

    def keep_offset(self, offset):
        """This boot's clock offset on flash, for its readings that a reboot leaves there."""
        if self.state.offsets.get(self.boot) != offset:
            self.state.set_offset(self.boot, offset, self.store.oldest_boot(self.boot))

    def offset_for(self, boot):
        """Unix ms minus boot ms for readings of `boot`, or None when its time is unknown."""
        if boot == self.boot:
            return self.clock.best_offset()
        return self.state.offsets.get(boot)

    def on_config(self, settings):
        """Apply a CONFIG frame: None when applied and saved, else (wire reason, text).

        The whole result is checked first (config.apply_remote), so a refused CONFIG stops
        nothing. Only then do the old sensors stop and the new ones start; the file is saved
        last, so the table on flash is one that started here.
        """
        from node import config  # its checks are needed at boot and here only

        try:
            return self._apply_config(config, settings)
        finally:
            forget("config")

    def _apply_config(self, config, settings):
        try:
            new = config.apply_remote(self.cfg, settings)
        except config.ConfigError as e:
            log.error("CONFIG refused: %s", e)
            return (wire.UNSUPPORTED if e.unsupported else wire.BAD_PAYLOAD), str(e)
        old = self.cfg
        swap = new["sensors"] != old["sensors"]
        try:
            if swap:
                self._use_sensors(new["sensors"])
            config.save(new)
        except Exception as e:  # checked, yet the hardware or the flash refused
            log.error("CONFIG not applied: %s: %s", type(e).__name__, e)
            if swap:
                self._use_sensors(old["sensors"])  # what ran before runs again
            return wire.INTERNAL, "%s: %s" % (type(e).__name__, e)
        self.cfg = new
        # At once, every one: the store's flush triggers, the sampler's interval (a sleep of the
        # old interval would hold it back), the link's batching; housekeeping reads cfg itself
        # (no_network_reboot_s, and deep_sleep_ms, which puts the node to sleep there).
        log.LEVEL = new["log_level"]
        self.store.flash_every = new["flash_every"]
        self.store.flash_after_ms = new["flash_after_ms"]
        if new["interval_ms"] != old["interval_ms"] and self._sampler is not None:
            self._sampler.cancel()
            self._sampler = asyncio.create_task(self.sampler())
        log.info("CONFIG applied: %s", ",".join(settings))
        if swap:
            self.link.request_hello()
        self.link.wake()  # batch_max, send_after_ms
        return None

    def on_stale_boot(self, latest):
        # The gateway saw a later boot of ours (this flash was erased without re-provisioning):
        # move past it and start afresh so that new readings get identities it has not seen.
        log.error("gateway has seen boot %d; restarting as boot %d", latest, latest + 1)
        self.state.boot = latest
        self.shutdown()
        machine.reset()

    # ----- housekeeping -----

    def shutdown(self):
        """Before an intentional reset: keep what RAM holds."""
        self.store.flush()
        self._collect_drops()
        self.rtc.save_pulses(self.sensors.pulses)
        self.save_state()

    def boot_is_good(self):
        if self.app is not None and self.app.get("kind") == _IMAGE:
            self.state.mark_good()  # the image is kept only at its confirmation
        else:
            _boot_is_good(self.state)

    # ----- updates (docs/ota.md) -----

    def _confirm(self):
        from node import trial  # a trial boot's moments only

        try:
            trial.confirm(self)
        finally:
            forget("trial")

    def _trial_expired(self):
        from node import trial

        trial.expire(self)

    async def housekeeping(self):
        good = False
        reported = 0
        pulses_saved = 0  # boot ms of the last pulse totals on flash
        while True:
            cfg = self.cfg  # a CONFIG frame replaces it
            if self.wdt is not None:
                self.wdt.feed()
            now = self.clock.now()
            if self.rtc.save_pulses(self.sensors.pulses):
                self._pulses_moved = True
            if self.store.maybe_flush(now):
                log.debug("saved through seq %d", self.store.saved_seq)
            self._collect_drops()
            if log.LEVEL >= 3 and now - reported >= _HEAP_REPORT_MS:
                reported = now
                self._report_heap()
            if self.state.drops_unsaved() and self.store.flash_writes:
                self.save_state()  # with the flash writes the buffer makes anyway
                self.store.flash_writes = 0
            every = cfg["pulse_flash_s"] * 1000
            if self._pulses_moved and every and now - pulses_saved >= every:
                self.save_state()  # RTC memory does not outlive a power cut
                pulses_saved = now
            if not good and now >= cfg["good_after_ms"]:
                good = True
                self.boot_is_good()
            if self.app is not None and now >= cfg["ota_trial_s"] * 1000:
                self._trial_expired()
            if cfg["deep_sleep_ms"]:  # a CONFIG switched battery mode on
                self.sleep()
            limit = cfg["no_network_reboot_s"] * 1000
            if limit and now - self.link.last_ack_ms > limit:
                log.error("no gateway for %d s: rebooting", cfg["no_network_reboot_s"])
                self.shutdown()
                machine.reset()
            await asyncio.sleep_ms(_HOUSEKEEPING_MS)

    def _report_heap(self):
        gc.collect()
        log.debug("heap alloc=%d free=%d readings=%d", gc.mem_alloc(), gc.mem_free(), self.taken)

    async def run(self):
        self._sampler = asyncio.create_task(self.sampler())
        asyncio.create_task(self.link.run())
        await self.housekeeping()

    # ----- battery mode -----

    async def run_cycle(self):
        """Deep-sleep mode: read, send what is buffered, sleep. RTC memory carries the boot."""
        feeding = asyncio.create_task(self.wdt.keep_fed())  # each step below is bounded
        self.sample_once()
        try:
            await asyncio.wait_for_ms(self.link.run(once=True), self.cfg["ack_timeout_ms"] * 3)
        except asyncio.TimeoutError:
            log.info("gateway not reached this cycle")
        feeding.cancel()
        if self.app is not None and self._clean and self.link.acked:
            self._confirm()  # a deep-sleep cycle samples before it reaches the gateway
        self.state.mark_good()
        if not self.resumed and (self.app is None or self.app.get("kind") != _IMAGE):
            mark_app_valid()  # the boot's first cycle went through
        if self.cfg["deep_sleep_ms"]:
            self.sleep()
        log.info("deep sleep off: sampling continuously")  # a CONFIG in this cycle said so
        await self.run()

    def sleep(self):
        """Keep what RAM holds, then deep-sleep for deep_sleep_ms; the wake continues the boot."""
        self.shutdown()
        ms = self.cfg["deep_sleep_ms"]
        self.rtc.save_sleep(self.boot, self.seq, self.link.guard.last_sent,
                            self.clock.now() + ms, self.clock.offset)
        machine.deepsleep(ms)


# ----- start-up -----

def read_json(path):
    """A JSON file's object, or {} when it is missing or was never completed."""
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(path, doc):
    """Replace `path` atomically: a new file renamed over the old one (littlefs)."""
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.rename(path + ".tmp", path)


def mark_app_valid():
    """Keep the running firmware image: an OTA build's bootloader rolls back, at the next
    reset, an image that never said so (ESP-IDF app rollback)."""
    try:
        esp32.Partition.mark_app_valid_cancel_rollback()
        log.info("firmware image marked valid")
    except OSError as e:
        if e.errno == _NO_ROLLBACK:
            log.info("firmware image: this bootloader has no rollback")
        else:
            log.error("firmware image not marked valid: %s", e)


def _boot_is_good(state):
    """The boot has lived good_after_ms: it ends the run of bad boots, and keeps the image."""
    state.mark_good()
    mark_app_valid()


def safe_mode(state, reason, cfg=None):
    """No readings; say why on the console and (with a config to reach it) to the gateway."""
    from node import safe  # only safe mode needs it

    safe.enter(state, reason, cfg, read_json(APP_PATH).get("version") or VERSION)


def leave_safe_mode():
    state = State()
    state.bad_boots = 0
    state.safe_reason = ""
    state.save()
    machine.reset()


def _console_window(ms):
    if ms:
        print("kinhbac: starting in %d ms (Ctrl-C for the REPL, watchdog off)" % ms)
        time.sleep_ms(ms)


def _claim(cfg, state):
    from node.claim import Claimer  # only a board set up offline needs it

    try:
        wdt = Watchdog(cfg["watchdog_ms"])
        asyncio.run(Claimer(cfg, state, VERSION, wdt, lambda: _boot_is_good(state)).run())
    except KeyboardInterrupt:
        raise
    except Exception as e:
        _reboot_after(state, e)


def _reboot_after(state, e):
    """Record why this boot failed (safe mode reports it after too many), then reboot."""
    sys.print_exception(e)
    state.last_error = "%s: %s" % (type(e).__name__, e)
    state.drops[wire.DROP_CRASHES] += 1
    state.save()
    time.sleep_ms(100)
    machine.reset()


def _resets(state):
    return " ".join("%d:%s" % (b, wire.RESET_NAMES.get(c, c)) for b, c in state.resets)


def _load_config():
    """The config file's settings, checked, and whether the board is to claim an identity.

    node/config.py is dropped from the heap after (about 6 KB of bytecode on an ESP32): a
    running node needs it again only when a CONFIG frame comes (Node.on_config).
    """
    from node import config

    try:
        cfg = config.load()
        return cfg, config.claiming(cfg)
    finally:
        forget("config")


def main():
    state = State()
    rtc = RtcMemory()
    resumed = rtc.load_sleep()
    cause = wire_reset_cause(machine)
    try:
        cfg, claiming = _load_config()
    except ValueError as e:
        state.begin_boot(cause)
        safe_mode(state, str(e))
        return
    log.LEVEL = cfg["log_level"]
    if resumed is None or cfg["deep_sleep_ms"] == 0:
        retry = state.safe_retry  # safe mode's time is up: this boot may try
        state.safe_retry = False
        state.begin_boot(cause)
        if state.bad_boots > cfg["safe_mode_after"] and not retry:
            safe_mode(state, "%d boots in a row failed; last error: %s" % (
                state.bad_boots - 1, state.last_error or "none recorded"), cfg)
            return
        if retry:
            log.info("trying a normal boot after safe mode")
        _console_window(cfg["console_window_ms"])
        if claiming:
            _claim(cfg, state)
            return
        boot, clock = state.boot, Clock()
    else:
        boot, seq, counter, ms, offset = resumed
        clock = Clock(ms)
        if offset is not None:
            clock.offset = offset
            clock.synced_at = 0  # this boot synced before it slept
    try:
        node = Node(cfg, state, boot, clock, rtc)
        if resumed is not None and cfg["deep_sleep_ms"]:
            node.resumed = True
            node.seq = resumed[1]
            node.link.set_counter(resumed[2])
        else:
            log.info("boot %d, firmware %s, %d sensors; resets: %s", boot, node.version,
                     len(cfg["sensors"]), _resets(state))
        if not clock.synced and clock.from_rtc():
            # An earlier boot set the RTC: this one's readings get Unix times even if it never
            # reaches the gateway (flagged PRE_SYNC until it does).
            if not node.resumed or boot not in state.offsets:
                log.info("clock from the RTC, set by an earlier boot")
                node.keep_offset(clock.rtc_offset)
        node.wdt = Watchdog(cfg["watchdog_ms"])
        gc.collect()
        if cfg["deep_sleep_ms"]:
            asyncio.run(node.run_cycle())
        else:
            asyncio.run(node.run())
    except KeyboardInterrupt:
        raise
    except Exception as e:
        _reboot_after(state, e)
