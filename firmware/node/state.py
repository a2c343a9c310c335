# Counters that must outlive a reboot: the boot counter (part of every reading's identity and
# of the replay window), the run of boots that never became good (safe mode), the drop
# counters reported in HELLO (cumulative since provisioning), each recent boot's clock
# offset (so that readings buffered on flash can be stamped after a reboot), and the pulse
# sensors' totals as of the last write (RTC memory has newer ones unless the power was cut:
# node/rtc.py).
# Written atomically, and rarely: at boot, when a boot becomes good, on the first clock sync
# of a boot, together with buffer flushes when the drop counters moved, every `pulse_flash_s`
# while pulses come in, and before an intentional reset.
import json
import os

PATH = "/state.json"
KEEP_OFFSETS = 4  # boots whose clock offsets are kept: enough for a few reboots mid-outage


class State:
    def __init__(self, path=PATH):
        self.path = path
        self.boot = 0
        self.bad_boots = 0
        self.drops = [0, 0, 0]  # buffer full, storage error, sensor error (wire.DROP_*)
        self.offsets = {}  # boot -> Unix ms minus the boot's monotonic ms
        self.safe_reason = ""
        self.last_error = ""  # why the last boot crashed: safe mode reports it
        self.pulses = {}  # pulse sensor name -> pulses counted since provisioning
        self._saved_drops = [0, 0, 0]
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return  # first boot, or a file that was never completed: start from zero
        self.boot = saved.get("boot", 0)
        self.bad_boots = saved.get("bad_boots", 0)
        self.drops = list(saved.get("drops", self.drops))
        while len(self.drops) < 3:
            self.drops.append(0)
        self.offsets = {int(b): o for b, o in saved.get("offsets", {}).items()}
        self.safe_reason = saved.get("safe_reason", "")
        self.last_error = saved.get("last_error", "")
        self.pulses = saved.get("pulses", {})
        self._saved_drops = list(self.drops)

    def save(self):
        doc = {
            "boot": self.boot,
            "bad_boots": self.bad_boots,
            "drops": self.drops,
            "offsets": {str(b): o for b, o in self.offsets.items()},
            "safe_reason": self.safe_reason,
            "last_error": self.last_error,
            "pulses": self.pulses,
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.rename(tmp, self.path)
        self._saved_drops = list(self.drops)

    def begin_boot(self):
        """A new boot: its number, and one more boot that has not yet proved good."""
        self.boot += 1
        self.bad_boots += 1
        self.save()

    def mark_good(self):
        if self.bad_boots or self.safe_reason or self.last_error:
            self.bad_boots = 0
            self.safe_reason = ""
            self.last_error = ""
            self.save()

    def set_offset(self, boot, offset_ms):
        first = boot not in self.offsets
        self.offsets[boot] = offset_ms
        if first:
            while len(self.offsets) > KEEP_OFFSETS:
                del self.offsets[min(self.offsets)]
            self.save()

    def drops_unsaved(self):
        return self.drops != self._saved_drops
