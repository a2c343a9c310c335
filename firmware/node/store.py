# The reading buffer: a RAM ring in front of segment files on flash.
#
# Readings enter the RAM ring. While the gateway acknowledges them promptly they leave from
# RAM and never touch flash. Unacknowledged readings are written to flash in groups: when
# `flash_every` of them wait in RAM, or when the oldest has waited `flash_after_ms`. So a power
# cut loses at most the readings since the last flash write (fewer than `flash_every`, none
# older than `flash_after_ms`), and flash sees one append per group, never one per reading.
#
# On flash, readings sit in segment files of fixed-size records (at most SEGMENT_READINGS, and
# an eighth of the flash capacity, so that dropping the oldest segment drops few), oldest
# first. A segment is deleted once the gateway has acknowledged its last reading. When flash
# holds `flash_readings`, the oldest segment is dropped and its readings are counted (the
# full-buffer policy: drop the oldest, keep the newest). Records are in (boot, seq) order,
# which is the order they are sent in; the gateway's cumulative ACK removes a prefix.
import os
import struct
from micropython import const

REC = "<IIQfBBxx"  # boot, seq, boot ms, value, sensor index, flags
REC_SIZE = const(24)
F_PRE_SYNC = const(1)  # taken before the boot's first clock sync
# 4,080-byte files: one 4 KiB littlefs block each (a file's first block carries no skip-list
# pointer). 256 records (6 KiB) took two blocks, a third of the second one empty: the default
# buffer of 16,384 readings took 134 blocks of the vfs partition, now 105 (measured).
SEGMENT_READINGS = const(170)
_BLOCK = const(4096)  # a littlefs block
_STATE_BLOCKS = const(2)  # kept free for the state files' atomic rewrites (a new file, renamed)
_MAX_U32 = 0xFFFFFFFF  # HELLO's field; a host filesystem (tests under the unix port) has more


def _after(boot, seq, ref_boot, ref_seq):
    return boot > ref_boot or (boot == ref_boot and seq > ref_seq)


class Store:
    def __init__(self, ram_readings, flash_readings, flash_every, flash_after_ms, folder="/buf"):
        self._ram = bytearray(ram_readings * REC_SIZE)
        self._mv = memoryview(self._ram)
        self._cap = ram_readings
        self._head = 0
        self._n = 0
        self._rec = bytearray(REC_SIZE)
        self.flash_readings = flash_readings
        self.flash_every = flash_every
        self.flash_after_ms = flash_after_ms
        self.folder = folder
        self.acked_boot = 0
        self.acked_seq = 0
        self.dropped_full = 0  # counted for HELLO: the full-buffer policy ran
        self.dropped_storage = 0  # counted for HELLO: flash could not take them
        self.flash_writes = 0
        self.saved_boot = 0  # the newest reading on flash, for the console
        self.saved_seq = 0
        self.seg_readings = max(4, min(SEGMENT_READINGS, flash_readings // 8))
        self._segs = []  # [name, count, skip]: records [skip:count] not yet acknowledged
        self._next_seg = 0
        self._scan()

    # ----- flash segments -----

    def _scan(self):
        try:
            names = sorted(os.listdir(self.folder))
        except OSError:
            os.mkdir(self.folder)
            names = []
        for name in names:
            path = self.folder + "/" + name
            if name.endswith(".tmp"):
                os.remove(path)
                continue
            count = os.stat(path)[6] // REC_SIZE
            if count == 0:
                os.remove(path)
                continue
            self._segs.append([name, count, 0])
            self._next_seg = int(name) + 1

    def _path(self, seg):
        return self.folder + "/" + seg[0]

    def _read_key(self, f, index):
        f.seek(index * REC_SIZE)
        f.readinto(self._rec)
        return struct.unpack_from("<II", self._rec, 0)

    def _first_after(self, f, seg, boot, seq):
        """Index of the segment's first record after (boot, seq): a binary search on flash."""
        lo, hi = seg[2], seg[1]
        while lo < hi:
            mid = (lo + hi) // 2
            b, s = self._read_key(f, mid)
            if _after(b, s, boot, seq):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def flash_pending(self):
        n = 0
        for seg in self._segs:
            n += seg[1] - seg[2]
        return n

    def oldest_boot(self, default):
        """The boot of the oldest reading not yet acknowledged, or `default` when none waits."""
        for seg in self._segs:
            if seg[2] < seg[1]:
                with open(self._path(seg), "rb") as f:
                    return self._read_key(f, seg[2])[0]
        if self._n:
            return struct.unpack_from("<I", self._ram, self._head * REC_SIZE)[0]
        return default

    def free_flash(self):
        """Flash bytes an update's files may use, as HELLO reports it and node/ota.py checks an
        offer with it: littlefs's free blocks, less what this buffer may still take (its
        capacity less the records it holds) and the state files' blocks; None if the
        filesystem cannot say."""
        try:
            st = os.statvfs("/")
        except OSError:
            return None
        held = 0
        for seg in self._segs:
            held += seg[1]
        promised = max(self.flash_readings - held, 0) * REC_SIZE
        return min(max(st[0] * st[3] - promised - _STATE_BLOCKS * _BLOCK, 0), _MAX_U32)

    def pending(self):
        """Readings not yet acknowledged by the gateway."""
        return self.flash_pending() + self._n

    def _append_flash(self, first, count):
        """Write RAM records [first, first+count) (no wrap) to the newest segment(s)."""
        done = 0
        while done < count:
            # A new segment is listed only once its file holds its records: listed before, a
            # write that failed (no heap, no flash) left a segment with no file, and every
            # later read of it ended the session with ENOENT.
            new = not self._segs or self._segs[-1][1] >= self.seg_readings
            seg = ["%08d" % self._next_seg, 0, 0] if new else self._segs[-1]
            k = min(count - done, self.seg_readings - seg[1])
            start = (first + done) * REC_SIZE
            with open(self._path(seg), "ab") as f:
                f.write(self._mv[start:start + k * REC_SIZE])
            if new:
                self._segs.append(seg)
                self._next_seg += 1
            seg[1] += k
            done += k

    def flush(self):
        """Write every reading waiting in RAM to flash; False if flash refused (kept in RAM)."""
        if self._n == 0:
            return True
        if self.flash_readings == 0:
            return False
        try:
            first_part = min(self._n, self._cap - self._head)
            self._append_flash(self._head, first_part)
            if first_part < self._n:
                self._append_flash(0, self._n - first_part)
        except (OSError, MemoryError):
            # Full or failing flash, or a heap too short for the moment (an update's download
            # takes most of it): the readings stay in RAM, and the next flush tries again.
            return False
        self.flash_writes += 1
        last = ((self._head + self._n - 1) % self._cap) * REC_SIZE
        self.saved_boot, self.saved_seq = struct.unpack_from("<II", self._ram, last)
        self._head = 0
        self._n = 0
        self._enforce_flash_limit()
        return True

    def _enforce_flash_limit(self):
        total = 0
        for seg in self._segs:
            total += seg[1]
        while total > self.flash_readings and self._segs:
            seg = self._segs.pop(0)
            total -= seg[1]
            self.dropped_full += seg[1] - seg[2]
            os.remove(self._path(seg))

    def maybe_flush(self, now_ms):
        """Flush when the oldest reading in RAM has waited flash_after_ms unacknowledged."""
        if self._n == 0:
            return False
        t0 = struct.unpack_from("<Q", self._ram, self._head * REC_SIZE + 8)[0]
        if now_ms - t0 >= self.flash_after_ms:
            return self.flush()
        return False

    # ----- readings in and out -----

    def add(self, boot, seq, t_ms, value, sensor, flags):
        if self._n == self._cap and not self.flush():
            # RAM full and flash unavailable (or disabled): drop the oldest in RAM.
            self._head = (self._head + 1) % self._cap
            self._n -= 1
            if self.flash_readings == 0:
                self.dropped_full += 1
            else:
                self.dropped_storage += 1
        i = (self._head + self._n) % self._cap
        struct.pack_into(REC, self._ram, i * REC_SIZE, boot, seq, t_ms, value, sensor, flags)
        self._n += 1
        if self._n >= self.flash_every:
            self.flush()  # the power-cut bound: never flash_every unsaved readings in RAM

    def ack(self, boot, seq):
        """The gateway holds every reading up to (boot, seq): forget them."""
        if not _after(boot, seq, self.acked_boot, self.acked_seq):
            return
        self.acked_boot = boot
        self.acked_seq = seq
        while self._segs:
            seg = self._segs[0]
            with open(self._path(seg), "rb") as f:
                skip = self._first_after(f, seg, boot, seq)
            if skip < seg[1]:
                seg[2] = skip
                break
            self._segs.pop(0)
            os.remove(self._path(seg))
        while self._n:
            b, s = struct.unpack_from("<II", self._ram, self._head * REC_SIZE)
            if _after(b, s, boot, seq):
                break
            self._head = (self._head + 1) % self._cap
            self._n -= 1

    def read_after(self, boot, seq, out, max_n):
        """Copy up to max_n records that follow (boot, seq) into `out`, oldest first.

        The copied run is contiguous (one boot, consecutive seqs), as a READINGS batch must be.
        Returns how many were copied.
        """
        n = 0
        nb = ns = 0
        mv = memoryview(out)
        for seg in self._segs:
            if n >= max_n:
                return n
            with open(self._path(seg), "rb") as f:
                i = self._first_after(f, seg, boot, seq)
                if i >= seg[1]:
                    continue
                k = min(seg[1] - i, max_n - n)
                f.seek(i * REC_SIZE)
                f.readinto(mv[n * REC_SIZE:(n + k) * REC_SIZE])
            for j in range(n, n + k):
                b, s = struct.unpack_from("<II", out, j * REC_SIZE)
                if j and (b != nb or s != ns + 1):
                    return j
                nb, ns = b, s
            n += k
        for k in range(self._n):
            if n >= max_n:
                break
            src = ((self._head + k) % self._cap) * REC_SIZE
            b, s = struct.unpack_from("<II", self._ram, src)
            if not _after(b, s, boot, seq):
                continue
            if n and (b != nb or s != ns + 1):
                break
            out[n * REC_SIZE:(n + 1) * REC_SIZE] = self._mv[src:src + REC_SIZE]
            nb, ns = b, s
            n += 1
        return n
