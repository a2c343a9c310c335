# Counters that must outlive a reboot: the boot counter (part of every reading's identity and
# of the replay window), the run of boots that never became good (safe mode), the counters
# reported in HELLO (cumulative since provisioning; each sensor's failure counts too, which
# move only when counters 2 and 3 do and so go to flash in the same writes), the reset cause
# of the last boots, the clock offset of each boot whose readings may still be on flash (so
# that they can be stamped after any number of reboots), and the pulse sensors' totals as of
# the last write (RTC memory has newer ones unless the power was cut: node/rtc.py).
# Written atomically, and rarely: at boot, when a boot becomes good, when a boot's clock offset
# is first known (from the RTC or the gateway), together with buffer flushes when the counters
# moved, every `pulse_flash_s` while pulses come in, and before an intentional reset.
import json
import os
from micropython import const

import wire

PATH = "/state.json"
# HELLO's counters: positions wire.DROP_* names, used as wire.DROP_X. Another module's const()
# is a global lookup here anyway, and copies as this module's consts cost 4 names (256 heap
# bytes as .mpy on the unix port).
COUNTERS = const(7)  # len(wire.DROP_NAMES)
KEEP_OFFSETS = const(100)  # boots' clock offsets at most: 25 h of reboots every 15 min
KEEP_RESETS = const(8)  # (boot, wire reset cause) of the last boots, newest last


class State:
    def __init__(self, path=PATH):
        self.path = path
        self.boot = 0
        self.bad_boots = 0
        self.drops = [0] * COUNTERS  # HELLO's counters, positions above
        self.offsets = {}  # boot -> Unix ms minus the boot's monotonic ms
        self.resets = []  # [boot, wire reset cause] of the last KEEP_RESETS boots
        self.safe_reason = ""
        self.safe_retry = False  # safe mode's hour is up: the next boot tries the app once
        self.last_error = ""  # why the last boot crashed: safe mode reports it
        self.pulses = {}  # pulse sensor name -> pulses counted since provisioning
        # sensor name -> [could not read, out of range] since provisioning, as of the last write
        self.sensor_failures = {}
        self._saved_drops = list(self.drops)
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return  # first boot, or a file that was never completed: start from zero
        self.boot = saved.get("boot", 0)
        self.bad_boots = saved.get("bad_boots", 0)
        self.drops = list(saved.get("drops", self.drops))
        while len(self.drops) < COUNTERS:
            self.drops.append(0)
        self.offsets = {int(b): o for b, o in saved.get("offsets", {}).items()}
        self.resets = saved.get("resets", [])
        self.safe_reason = saved.get("safe_reason", "")
        self.safe_retry = saved.get("safe_retry", False)
        self.last_error = saved.get("last_error", "")
        self.pulses = saved.get("pulses", {})
        self.sensor_failures = _failure_pairs(saved.get("sensor_failures"))
        self._saved_drops = list(self.drops)

    def save(self):
        doc = {
            "boot": self.boot,
            "bad_boots": self.bad_boots,
            "drops": self.drops,
            "offsets": {str(b): o for b, o in self.offsets.items()},
            "resets": self.resets,
            "safe_reason": self.safe_reason,
            "safe_retry": self.safe_retry,
            "last_error": self.last_error,
            "pulses": self.pulses,
            "sensor_failures": self.sensor_failures,
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.rename(tmp, self.path)
        self._saved_drops = list(self.drops)

    def begin_boot(self, cause):
        """A new boot (`cause`: its wire reset cause): its number, and one more boot that has
        not yet proved good. A power-on reset says the last boot lost its power (a cut, or a
        brownout, which the port reports as a power-on): that one did not fail."""
        if cause == wire.RESET_POWER_ON and self.bad_boots:
            self.bad_boots -= 1
        elif cause == wire.RESET_WATCHDOG:
            self.drops[wire.DROP_WATCHDOG_RESETS] += 1
        self.boot += 1
        self.bad_boots += 1
        self.resets.append([self.boot, cause])
        while len(self.resets) > KEEP_RESETS:
            self.resets.pop(0)
        self.save()

    def mark_good(self):
        if self.bad_boots or self.safe_reason or self.last_error:
            self.bad_boots = 0
            self.safe_reason = ""
            self.last_error = ""
            self.save()

    def set_offset(self, boot, offset_ms, oldest_boot):
        """Keep `boot`'s clock offset, forgetting those of boots older than `oldest_boot` (the
        oldest with readings still buffered); saved when it changed."""
        if self.offsets.get(boot) == offset_ms:
            return
        self.offsets[boot] = offset_ms
        for b in [b for b in self.offsets if b < oldest_boot]:
            del self.offsets[b]
        while len(self.offsets) > KEEP_OFFSETS:
            del self.offsets[min(self.offsets)]
        self.save()

    def drops_unsaved(self):
        return self.drops != self._saved_drops


def _failure_pairs(saved):
    # {name: [a, b]} of u32s as this firmware writes them. Anything else (a file written by
    # another firmware) counts from zero: HELLO's encoder would refuse it, and no HELLO would go.
    pairs = {}
    if isinstance(saved, dict):
        for name, pair in saved.items():
            if isinstance(pair, list) and len(pair) == 2 and all(
                    type(n) is int and 0 <= n <= wire.MAX_U32 for n in pair):
                pairs[name] = pair
    return pairs
